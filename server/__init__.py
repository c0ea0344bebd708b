"""softserve: serve many soft prompts over one frozen T5, batching rows of different tasks together."""

import os

# Before torch loads OpenMP: idle intra-op threads sleep instead of spinning, so on a CPU the model's
# threads leave the cores to the HTTP event loop between parallel regions. It only takes effect if it is set
# before torch is first imported (bench/server_vs_raw records the policy each side ran under).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
