"""CTranslate2 in a process of its own, for bench/engine_vs_ctranslate2.py, as a plain CTranslate2 script runs.

In the bench's own process CTranslate2's OpenMP calls bind to torch's libgomp (loaded first, its symbols
global), not to the libgomp CTranslate2 ships: both sides would share one OpenMP runtime with two threads that
start teams, and libgomp then stops spinning for both (server/cpus.py). Here nothing loads torch, so
CTranslate2 runs alone on its own libgomp, under the OpenMP settings the bench was started in.

Usage: `python bench/engine_vs_ctranslate2_side.py MODEL_DIR DEVICE COMPUTE_TYPE THREADS`. It prints one JSON
line when its translator is ready (`{"version": ...}`), then answers each JSON request on stdin
(`{"sources": [[token, ...], ...], "new_tokens": N, "suppress": [[token], ...] or null}`) with one line:
`{"tokens": [[token, ...], ...], "seconds": S}`, the greedy tokens of each source (exactly `new_tokens`) and
the seconds `translate_batch` took.
"""

from __future__ import annotations

import json
import sys
import time

import ctranslate2


def main(argv: list[str]) -> None:
    directory, device, compute_type, threads = argv
    translator = ctranslate2.Translator(
        directory, device=device, compute_type=compute_type, inter_threads=1, intra_threads=int(threads)
    )
    print(json.dumps({"version": ctranslate2.__version__}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        new_tokens = request["new_tokens"]
        started = time.perf_counter()
        results = translator.translate_batch(
            request["sources"],
            beam_size=1,
            min_decoding_length=new_tokens,
            max_decoding_length=new_tokens,
            suppress_sequences=request["suppress"],
        )
        seconds = time.perf_counter() - started
        print(json.dumps({"tokens": [r.hypotheses[0] for r in results], "seconds": seconds}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
