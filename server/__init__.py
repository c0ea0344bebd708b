"""softserve: serve many soft prompts over one frozen T5, batching rows of different tasks together."""

import os

# Before torch loads OpenMP (libgomp): an idle intra-op thread spins about 0.1 ms (10,000 spins) and then sleeps.
# Within a pass torch's parallel regions follow each other within microseconds, so the threads stay awake and
# each region starts at once; between passes they sleep and leave the cores to the API process. Sleeping at once
# (`OMP_WAIT_POLICY=PASSIVE`) made every region wake its threads through the kernel: a t5-small decoder loop at
# batch 32 made 680 tokens/s that way against 880 spinning briefly. libgomp spins only while no more threads
# are in OpenMP teams than there are cores, so each process runs its parallel torch work on one thread
# (`server.cpus.serial_thread`). An `OMP_WAIT_POLICY` or `GOMP_SPINCOUNT` of the environment wins.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")
