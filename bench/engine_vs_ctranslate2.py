"""The engine's decoder loop ÷ CTranslate2: new tokens per second on the same weights and inputs, at batch 1, 8 and 32.

Both sides decode the same rows greedily, exactly `--new-tokens` (32) tokens each with end-of-sequence
banned, from one random model with t5-small's shapes saved as a checkpoint (tests/checkpoints.py), in fp32 on
`--threads` (2) CPU threads, and both include the encoder pass:
- engine loop: the continuous engine as bench/decode_vs_generate.py drives it (`EngineLoop`: `Engine` pass
  by pass, every row joining in the first pass), on the checkpoint loaded with `FrozenT5.load`;
- CTranslate2: the checkpoint converted with `ctranslate2.converters.TransformersConverter`, one
  `Translator` (`inter_threads=1`, `intra_threads=--threads`), `translate_batch` with `beam_size=1` and
  `min_decoding_length` = `max_decoding_length` = `--new-tokens`.

Like for like. An engine row is a soft prompt and input tokens; CTranslate2 takes tokens only. So each
row's 20-row prompt is the input embeddings of 20 random byte tokens, and CTranslate2 gets those 20 tokens
and then the row's 32 input tokens (`</s>` included): 52 encoder positions on both sides, the same encoder
input, the same work. Greedy decoding of the same weights must then give the same tokens: the share of rows
that do is reported per batch size (and the mean share of each row's tokens before the first difference),
and the target counts only if every row agrees.

Vocabulary. The checkpoint's tokenizer (ByT5's bytes: 384 tokens with the sentinels) is smaller than the
model's 32128-row vocabulary. The converter pads its vocabulary with `<extra_id_N>` names counting from 0
again, so 125 names stand for two ids each and the ids past the tokenizer cannot be named. The bench renames
them (`<unused_ID>`, one name per id) in the converted model's vocabulary file. The engine never chooses an id
past the tokenizer; CTranslate2 does the same only when told to (`suppress_sequences` with those 31744 ids),
and that list costs it time on every call (passed and looked up each time). So the tokens are compared on a
call with the list, and the timed calls run without it, CTranslate2's fastest path: they decode other tokens
(ids past the tokenizer) but do the same work, since both sides decode exactly `--new-tokens` tokens whatever
they are.

Each side in its own process, as each runs in production. CTranslate2 ships a libgomp of its own, but in a
process that loaded torch first its OpenMP calls bind to torch's libgomp: the two sides would share one OpenMP
runtime, with two threads starting teams, and libgomp stops spinning for both when more threads are in teams
than there are cores (server/cpus.py). So the translator runs in a child process that never loads torch
(bench/engine_vs_ctranslate2_side.py), started with the OpenMP settings the bench was started in (usually
none: libgomp's default, spin a while, then sleep), and times its own calls; the engine runs here on the model
thread alone, under `softserve serve`'s settings (a short spin, common.py). Both policies are in the result.

Per batch size the two sides alternate (ABBA) on the benchmarks' model thread; each ratio is the median over
rounds of engine ÷ CTranslate2. Target: >= 1.0 at every batch size (and the same tokens); the reported
`ratio` is the smallest of the three.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from types import ModuleType

import common  # noqa: F401  (before torch: the server's OpenMP wait policy, see common.py)
from common import (
    INPUT_TOKENS,
    POLICY_BEFORE_SERVER,
    PROMPT_LENGTH,
    Comparison,
    compare,
    environment,
    input_texts,
    load_model,
    markdown_table,
    model_config,
    on_model_thread,
    parser,
    publish,
    results_file,
    wait_policy,
)
from decode_vs_generate import BATCH_SIZES, ENGINE, EngineLoop, same_tokens, tokens_per_s
from transformers import T5Config

from server.serving.model import FrozenT5, Row
from server.testing.checkpoints import save_checkpoint

TARGET = 1.0  # at every batch size
CT2 = "ctranslate2"
FIRST_BYTE_ID = 3  # ByT5: <pad>, </s>, <unk>, then the 256 bytes
SIDE_SCRIPT = Path(__file__).with_name("engine_vs_ctranslate2_side.py")
QUICK_VOCAB = 512  # more ids than the tokenizer's 384, as t5-small has (tiny's 259 are fewer: see `checkpoint_config`)


def import_ctranslate2() -> ModuleType:
    """CTranslate2, for its converter (the translator runs in a process of its own); exits 2 if absent."""
    try:
        import ctranslate2
    except ImportError:
        print("engine_vs_ctranslate2: ctranslate2 is not installed; `pip install -e '.[bench]'`", file=sys.stderr)
        sys.exit(2)
    return ctranslate2


class CTranslate2Side:
    """The checkpoint converted for CTranslate2, with a vocabulary that names every id once, and a translator in
    a process of its own (bench/engine_vs_ctranslate2_side.py), under the OpenMP settings the bench started in."""

    def __init__(self, ctranslate2: ModuleType, checkpoint: Path, directory: Path, model: FrozenT5, threads: int):
        ctranslate2.converters.TransformersConverter(str(checkpoint)).convert(str(directory), force=True)
        vocabulary_file = directory / "shared_vocabulary.json"
        converted = json.loads(vocabulary_file.read_text())
        decodable = model.decodable_vocab
        self.vocabulary = converted[:decodable] + [f"<unused_{i}>" for i in range(decodable, len(converted))]
        if len(set(self.vocabulary)) != len(self.vocabulary):
            raise RuntimeError("the converted vocabulary names some ids twice within the tokenizer's")
        vocabulary_file.write_text(json.dumps(self.vocabulary))
        self.ids = {token: i for i, token in enumerate(self.vocabulary)}
        self.banned = [[token] for token in self.vocabulary[decodable:]]
        environment = {name: value for name, value in os.environ.items() if name not in POLICY_BEFORE_SERVER}
        environment |= {name: value for name, value in POLICY_BEFORE_SERVER.items() if value is not None}
        compute_type = str(model.dtype).removeprefix("torch.")
        command = [sys.executable, str(SIDE_SCRIPT), str(directory), model.device.type, compute_type, str(threads)]
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=environment
        )
        self.version = self._answer()["version"]

    def _answer(self) -> dict:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the CTranslate2 process ended (exit status {self.process.wait()})")
        return json.loads(line)

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(timeout=60)

    def tokens(self, ids: Sequence[int]) -> list[str]:
        return [self.vocabulary[i] for i in ids]

    def translate(
        self, sources: list[list[str]], new_tokens: int, as_engine: bool = False
    ) -> tuple[list[list[int]], float]:
        """Greedy ids of each source, exactly `new_tokens` (`as_engine`: none past the tokenizer, as the engine),
        and the seconds the translator took."""
        assert self.process.stdin is not None
        request = {"sources": sources, "new_tokens": new_tokens, "suppress": self.banned if as_engine else None}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        answer = self._answer()
        return [[self.ids[token] for token in tokens] for tokens in answer["tokens"]], answer["seconds"]

    def decode(self, sources: list[list[str]], new_tokens: int, as_engine: bool = False) -> list[list[int]]:
        return self.translate(sources, new_tokens, as_engine)[0]

    def tokens_per_s(self, sources: list[list[str]], new_tokens: int, calls: int) -> float:
        """New tokens per second of `calls` calls, timed in the translator's process."""
        seconds = sum(self.translate(sources, new_tokens)[1] for _ in range(calls))
        return len(sources) * new_tokens * calls / seconds


def checkpoint_config(quick: bool) -> T5Config:
    """The run's shapes (`model_config`). A quick run's `tiny` has fewer vocabulary rows than the tokenizer has
    tokens, which the converter refuses; it gets a larger vocabulary, so that, as with t5-small's, some ids lie
    past the tokenizer and the renaming and suppression above run too."""
    config = model_config(quick)
    if quick:
        config.vocab_size = QUICK_VOCAB
    return config


def prompt_token_ids(count: int, seed: int) -> list[list[int]]:
    """`count` lists of `PROMPT_LENGTH` random byte ids: the tokens whose embeddings are the engine rows' prompts."""
    rng = random.Random(seed)
    return [[rng.randrange(FIRST_BYTE_ID, FIRST_BYTE_ID + 256) for _ in range(PROMPT_LENGTH)] for _ in range(count)]


def same_prefix(engine: list[list[int]], reference: list[list[int]]) -> float:
    """Mean share of a row's tokens before its first difference between the two sides (1: all the same)."""
    shares = []
    for a, b in zip(engine, reference, strict=True):
        prefix = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
        shares.append(prefix / len(a))
    return sum(shares) / len(shares)


def main(argv: list[str] | None = None) -> None:
    ctranslate2 = import_ctranslate2()
    args = parser(__doc__.splitlines()[0], repeats=8)
    args.set_defaults(threads=2)
    args.add_argument("--new-tokens", type=int, default=32, help="tokens each row decodes")
    args.add_argument("--calls", type=int, default=1, help="calls of each side per sample")
    opts = args.parse_args(argv)
    repeats, new_tokens, calls = (1, 8, 1) if opts.quick else (opts.repeats, opts.new_tokens, opts.calls)

    largest = max(BATCH_SIZES)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = save_checkpoint(checkpoint_config(opts.quick), Path(tmp) / "model")
        model = load_model(str(checkpoint), opts.device, opts.dtype, opts.threads)
        reference = CTranslate2Side(ctranslate2, checkpoint, Path(tmp) / "ctranslate2", model, opts.threads)
    embeddings = model.model.get_input_embeddings().weight.detach()
    prompt_ids = prompt_token_ids(largest, opts.seed)
    input_ids = model.tokenize(input_texts(model, largest, opts.seed))
    all_rows = [Row(model.prompt_on_device(embeddings[p]), i) for p, i in zip(prompt_ids, input_ids, strict=True)]
    all_sources = [reference.tokens(p + i) for p, i in zip(prompt_ids, input_ids, strict=True)]

    loop = EngineLoop(model, largest)
    comparisons: dict[int, Comparison] = {}
    agreement: dict[int, float] = {}
    prefix: dict[int, float] = {}
    for batch in BATCH_SIZES:
        rows, sources = all_rows[:batch], all_sources[:batch]
        ours = on_model_thread(loop.decode, rows, new_tokens)  # also the warm-up of both sides
        theirs = on_model_thread(partial(reference.decode, as_engine=True), sources, new_tokens)
        agreement[batch], prefix[batch] = same_tokens(ours, theirs, new_tokens), same_prefix(ours, theirs)
        comparisons[batch] = compare(
            (ENGINE, partial(tokens_per_s, loop.decode, rows, new_tokens, calls)),
            (CT2, partial(reference.tokens_per_s, sources, new_tokens, calls)),
            repeats,
        )
    reference.close()

    headers = ["batch", "engine loop tokens/s", "ctranslate2 tokens/s", "ratio (median of rounds)", "same tokens"]
    table = [[b, c.median(ENGINE), c.median(CT2), c.ratio, agreement[b]] for b, c in comparisons.items()]
    print(markdown_table(headers, table), end="\n\n")
    ratio = min(c.ratio for c in comparisons.values())
    result = {
        "bench": "engine_vs_ctranslate2",
        "ratio": round(ratio, 4),
        "target": TARGET,
        # Speed counts only for the same tokens: a faster loop that decodes other tokens misses the target.
        "meets_target": ratio >= TARGET and min(agreement.values()) == 1.0,
        "ratios": {str(b): round(c.ratio, 4) for b, c in comparisons.items()},
        "engine_tokens_per_s": {str(b): round(c.median(ENGINE), 1) for b, c in comparisons.items()},
        "ctranslate2_tokens_per_s": {str(b): round(c.median(CT2), 1) for b, c in comparisons.items()},
        "same_tokens": {str(b): round(share, 4) for b, share in agreement.items()},
        "same_prefix": {str(b): round(share, 4) for b, share in prefix.items()},
        "encoder_positions": PROMPT_LENGTH + INPUT_TOKENS,
        "new_tokens": new_tokens,
        "calls_per_sample": calls,
        "rounds": repeats,
        "ctranslate2_version": reference.version,
        "ctranslate2_threads": {"intra": opts.threads, "inter": 1},
        "ctranslate2_omp_wait_policy": wait_policy(POLICY_BEFORE_SERVER),
        **environment(model, opts.quick),
    }
    publish(result, results_file(opts, "engine_vs_ctranslate2"))


if __name__ == "__main__":
    main(sys.argv[1:])
