"""softserve: serve many soft prompts over one frozen T5, batching rows of different tasks together."""

import os

# Before torch loads OpenMP: idle intra-op threads sleep instead of spinning, so on a CPU the model's
# threads leave the cores to the HTTP event loop between parallel regions. Measured on 2 cores
# (bench/server_vs_raw): the server went from 0.75 to 0.95 of the raw model's throughput.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
