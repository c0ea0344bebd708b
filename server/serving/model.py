"""`FrozenT5`: the resident base model and the row layout that makes mixed-task batches exact.

Each row is `[prompt_i ; embed(input_i) incl. </s> ; pad...]`, right-padded, with an attention mask of
ones over its `P_i + L_i` positions that is also used for decoder cross-attention. T5 has only relative
positions, so a row's outputs do not depend on the other rows of its batch.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from transformers import (
    AutoTokenizer,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
    T5ForConditionalGeneration,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.modeling_outputs import BaseModelOutput

from server.cpus import usable_cores
from server.engine.protocol import TokenLogprobs
from server.serving.decoder import LeanDecoder
from server.serving.encoder import LeanEncoder
from server.serving.grammar import Grammars, grammar_tokenizer
from server.serving.hub import cache_only, log_hub_records_once
from server.serving.load_errors import checked_device, load_failure
from server.serving.tiny import build_tiny_t5

log = logging.getLogger(__name__)

TINY = "tiny"
SAMPLING_TOP_K = 50  # transformers' default for sampling, applied here with the other warpers
SCORE_CHUNK_ELEMENTS = 2**25  # values in one scoring call's logits, and in its copies of encoder outputs
NON_FINITE = "non_finite"


@dataclass(frozen=True)
class Row:
    """One batch row: a prompt already on the model's device and dtype, and its input token ids.

    `abandoned` is set by whoever waits for the row once it no longer wants the result (its client left, its
    deadline passed): the model then stops spending work on it.
    """

    prompt: torch.Tensor
    input_ids: list[int]
    abandoned: threading.Event = field(default_factory=threading.Event, compare=False, repr=False)

    @property
    def num_tokens(self) -> int:
        return self.prompt.shape[0] + len(self.input_ids)


@dataclass(frozen=True)
class Decoding:
    """Decoding settings shared by the rows of one `generate` call."""

    do_sample: bool = False
    num_beams: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False  # end-of-sequence is never chosen: rows run to their `max_new_tokens`
    logprobs: int | None = None  # each token's log-probability and this many alternatives' (the engine only)
    grammar: str | None = None  # llguidance grammar text the tokens must follow (the engine only)


@dataclass(frozen=True)
class Generation:
    token_ids: list[int]
    text: str
    finish_reason: str  # "eos" | "length" | NON_FINITE (the row's scores were inf/nan; no output)
    logprobs: list[TokenLogprobs] | None = None  # one per token, when asked for


class SuppressUndecodable(LogitsProcessor):
    """Bans ids past the tokenizer (T5 checkpoints pad the embedding matrix past the vocabulary)."""

    def __init__(self, first_invalid_id: int) -> None:
        self.first_invalid_id = first_invalid_id

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores[:, self.first_invalid_id :] = float("-inf")
        return scores


class BanToken(LogitsProcessor):
    """Never chooses one id (end-of-sequence, for rows that ignore it)."""

    def __init__(self, token_id: int) -> None:
        self.token_id = token_id

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores[:, self.token_id] = float("-inf")
        return scores


class FiniteScoresGuard(LogitsProcessor):
    """The last processor: a row whose scores hold NaN or +inf, or not one finite value, can be neither sampled
    (`multinomial` raises for the whole call) nor ranked. It is marked failed and left only end-of-sequence, so
    that it ends at once and the rows sharing its call carry on unchanged."""

    def __init__(self, rows: int, beams: int, eos_token_id: int, device: torch.device) -> None:
        self.beams = beams
        self.eos_token_id = eos_token_id
        self.failed = torch.zeros(rows, dtype=torch.bool, device=device)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        broken = scores.isnan().any(-1) | scores.isposinf().any(-1) | ~scores.isfinite().any(-1)
        self.failed |= broken.view(-1, self.beams).any(-1)
        scores.masked_fill_(broken[:, None], float("-inf"))
        scores[:, self.eos_token_id] = torch.where(broken, 0.0, scores[:, self.eos_token_id])
        return scores


class StopWhenAbandoned(StoppingCriteria):
    """Ends a `generate` call at the next step once none of its rows' results is wanted any more."""

    def __init__(self, rows: list[Row]) -> None:
        self.rows = rows

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: object) -> torch.BoolTensor:
        stop = all(row.abandoned.is_set() for row in self.rows)
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


def resolve_device(device: str) -> torch.device:
    """Raises `ModelLoadError` (one line for the operator) for a device this machine does not have."""
    return checked_device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        # T5 overflows in fp16; bf16 keeps fp32's range.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]


class FrozenT5:
    def __init__(
        self,
        model: T5ForConditionalGeneration,
        tokenizer: PreTrainedTokenizerBase,
        model_id: str,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.device = device
        self.dtype = dtype
        config = model.config
        self.d_model: int = config.d_model
        self.eos_token_id: int = config.eos_token_id
        self.pad_token_id: int = config.pad_token_id
        self.vocab_size: int = config.vocab_size
        self.decodable_vocab = min(len(tokenizer), config.vocab_size)
        self._embed = self.model.get_input_embeddings()
        self._suppress = [SuppressUndecodable(self.decodable_vocab)] if self.decodable_vocab < config.vocab_size else []
        self.decoder = LeanDecoder(self.model)  # label scoring; the engine's steps use one of their own
        self.encoder = LeanEncoder(self.model)

    @classmethod
    def load(cls, name: str, device: str = "auto", dtype: str = "auto") -> FrozenT5:
        """Loads `tiny`, a local checkpoint directory, or a hub id (safetensors preferred)."""
        target = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, target)
        if name == TINY:
            model, tokenizer = build_tiny_t5()
        else:
            source = str(Path(name)) if Path(name).is_dir() else name
            log_hub_records_once()
            local = cache_only(name)  # the hub unreachable: the cache at once, not a minute of retries
            try:
                tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local)
                model = T5ForConditionalGeneration.from_pretrained(source, dtype=torch_dtype, local_files_only=local)
            except (OSError, ValueError) as error:  # what transformers raises for a missing or unusable source
                raise load_failure(name, error) from error
        log.info("loaded %s on %s as %s", name, target, torch_dtype)
        return cls(model, tokenizer, name, target, torch_dtype)

    @cached_property
    def grammars(self) -> Grammars:
        """Structured output's compiled grammars for this model's tokenizer."""
        return Grammars(grammar_tokenizer(self.tokenizer, self.model.config.vocab_size, self.eos_token_id))

    def use_cpu_threads(self, threads: int) -> None:
        """On CPU, sets torch's threads; 0 keeps one per usable core (the most throughput). On a small shared
        machine, intra-op threads competing with the event loop and other processes make calls slower and their
        latency erratic; fewer threads trade throughput for steadier latency. Nothing to do on CUDA."""
        if self.device.type == "cpu":
            torch.set_num_threads(threads or usable_cores())

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, `</s>` included, not truncated (the caller enforces limits)."""
        return self.tokenizer(texts, add_special_tokens=True)["input_ids"]

    def prompt_on_device(self, embeddings: torch.Tensor) -> torch.Tensor:
        return embeddings.to(device=self.device, dtype=self.dtype)

    def layout(self, rows: list[Row]) -> tuple[torch.Tensor, torch.Tensor]:
        """Builds `inputs_embeds` `[B, T, d]` and the attention mask `[B, T]` by the exactness rule."""
        longest_input = max(len(row.input_ids) for row in rows)
        ids = torch.full((len(rows), longest_input), self.pad_token_id, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row.input_ids)] = torch.tensor(row.input_ids, dtype=torch.long)
        token_embeds = self._embed(ids.to(self.device))
        width = max(row.num_tokens for row in rows)
        embeds = torch.zeros(len(rows), width, self.d_model, device=self.device, dtype=self.dtype)
        mask = torch.zeros(len(rows), width, device=self.device, dtype=torch.long)
        for i, row in enumerate(rows):
            prompt_length = row.prompt.shape[0]
            embeds[i, :prompt_length] = row.prompt
            embeds[i, prompt_length : row.num_tokens] = token_embeds[i, : len(row.input_ids)]
            mask[i, : row.num_tokens] = 1
        return embeds, mask

    @torch.inference_mode()
    def encode(self, rows: list[Row]) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, mask = self.layout(rows)
        return self.encoder(embeds, mask), mask

    @torch.inference_mode()
    def embed(self, rows: list[Row]) -> torch.Tensor:
        """`[B, d_model]` in fp32: each row's encoder output averaged over its input's tokens (`</s>` included).

        The soft prompt's positions are left out: they are the same for every input of a task, so counting them
        would pull all of a task's embeddings towards one point. The prompt still shapes every input position
        (the encoder attends both ways), so two tasks embed the same text differently."""
        hidden, _ = self.encode(rows)
        vectors = [hidden[i, row.prompt.shape[0] : row.num_tokens].float().mean(dim=0) for i, row in enumerate(rows)]
        return torch.stack(vectors)

    @torch.inference_mode()
    def first_step_logits(self, rows: list[Row]) -> torch.Tensor:
        """Logits of the first decoder step, `[B, vocab]` (what tests compare across batches)."""
        hidden, mask = self.encode(rows)
        start = torch.full((len(rows), 1), self.model.config.decoder_start_token_id, device=self.device)
        out = self.model(
            encoder_outputs=BaseModelOutput(last_hidden_state=hidden),
            attention_mask=mask,
            decoder_input_ids=start,
        )
        return out.logits[:, 0]

    @torch.inference_mode()
    def generate(
        self,
        rows: list[Row],
        decoding: Decoding,
        max_new_tokens: list[int],
        step_gate: LogitsProcessor | None = None,
    ) -> list[Generation]:
        """A row whose scores turn non-finite ends with `finish_reason` NON_FINITE; the call stops early once
        every row is abandoned. `step_gate`, a processor that changes no score, is called at every step before
        the others (the engine uses it to run the call one step at a time)."""
        embeds, mask = self.layout(rows)
        config = GenerationConfig(
            max_new_tokens=max(max_new_tokens),
            num_beams=decoding.num_beams,
            do_sample=decoding.do_sample,
            **({"top_k": 0} if decoding.do_sample else {}),  # the sampling warpers are in `_processors`
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            decoder_start_token_id=self.model.config.decoder_start_token_id,
        )
        guard = FiniteScoresGuard(len(rows), decoding.num_beams, self.eos_token_id, self.device)
        with torch.random.fork_rng(devices=self._rng_devices(), enabled=decoding.seed is not None):
            if decoding.seed is not None:
                torch.manual_seed(decoding.seed)
            sequences = self.model.generate(
                inputs_embeds=embeds,
                attention_mask=mask,
                generation_config=config,
                logits_processor=self._processors(decoding, guard, step_gate),
                stopping_criteria=StoppingCriteriaList([StopWhenAbandoned(rows)]),
            )
        failed = guard.failed.tolist()
        return [
            Generation([], "", NON_FINITE) if bad else self._finish(seq[1:].tolist(), limit)
            for seq, limit, bad in zip(sequences, max_new_tokens, failed, strict=True)
        ]

    def _processors(
        self, decoding: Decoding, guard: FiniteScoresGuard, step_gate: LogitsProcessor | None = None
    ) -> LogitsProcessorList:
        """transformers' own order (suppression, then temperature, top-k, top-p), with the guard last: the
        library would put its sampling warpers after any processor passed in, where they could still overflow."""
        processors = LogitsProcessorList([step_gate] if step_gate is not None else [])
        processors.extend(self._suppress)
        if decoding.ignore_eos:
            processors.append(BanToken(self.eos_token_id))
        if decoding.do_sample:
            keep = 2 if decoding.num_beams > 1 else 1  # beam sampling keeps a token besides end-of-sequence
            if decoding.temperature != 1.0:
                processors.append(TemperatureLogitsWarper(decoding.temperature))
            processors.append(TopKLogitsWarper(SAMPLING_TOP_K, min_tokens_to_keep=keep))
            if decoding.top_p < 1.0:
                processors.append(TopPLogitsWarper(decoding.top_p, min_tokens_to_keep=keep))
        processors.append(guard)
        return processors

    def _rng_devices(self) -> list[torch.device]:
        return [self.device] if self.device.type == "cuda" else []

    def finished(self, tokens: list[int], reason: str) -> Generation:
        """A row that ended: its new tokens (EOS last when it ended the row) and their text."""
        text_ids = tokens[:-1] if reason == "eos" else tokens
        return Generation(tokens, self.tokenizer.decode(text_ids, skip_special_tokens=True), reason)

    def _finish(self, tokens: list[int], max_new_tokens: int) -> Generation:
        """A `generate` row: cut to its own limit, and at its first EOS."""
        tokens = tokens[:max_new_tokens]
        if self.eos_token_id in tokens:
            return self.finished(tokens[: tokens.index(self.eos_token_id) + 1], "eos")
        return self.finished(tokens, "length")

    @torch.inference_mode()
    def score(
        self, rows: list[Row], targets: list[list[list[int]]], chunk_elements: int = SCORE_CHUNK_ELEMENTS
    ) -> list[list[float]]:
        """Summed log-probability of each row's candidate targets (token ids incl. EOS).

        The encoder runs once per row; every candidate of a row reuses that row's encoder output. Candidates are
        scored in chunks whose logits, and whose copies of encoder outputs, hold at most about `chunk_elements`
        values, so one call's memory is bounded however many and long the labels. Candidates of abandoned rows
        are skipped (NaN). Non-finite sums are returned as they are: the caller decides what they mean.
        """
        hidden, mask = self.encode(rows)
        owners = [i for i, candidates in enumerate(targets) for _ in candidates]
        flat = [ids for candidates in targets for ids in candidates]
        sums = [math.nan] * len(flat)
        for chunk in self._score_chunks(flat, hidden.shape[1], chunk_elements):
            wanted = [j for j in chunk if not rows[owners[j]].abandoned.is_set()]
            if wanted:
                scores = self.log_likelihoods(hidden, mask, [owners[j] for j in wanted], [flat[j] for j in wanted])
                for j, total in zip(wanted, scores, strict=True):
                    sums[j] = total
        result, cursor = [], 0
        for candidates in targets:
            result.append(sums[cursor : cursor + len(candidates)])
            cursor += len(candidates)
        return result

    def _score_chunks(self, flat: list[list[int]], width: int, budget: int) -> Iterator[list[int]]:
        """Consecutive candidate indices, as many per chunk as the budget allows (at least one)."""
        chunk: list[int] = []
        longest = 0
        for j, ids in enumerate(flat):
            longest_with = max(longest, len(ids))
            if chunk and (len(chunk) + 1) * (longest_with * self.vocab_size + width * self.d_model) > budget:
                yield chunk
                chunk, longest_with = [], len(ids)
            chunk.append(j)
            longest = longest_with
        if chunk:
            yield chunk

    def log_likelihoods(
        self, hidden: torch.Tensor, mask: torch.Tensor, owners: list[int], candidates: list[list[int]]
    ) -> list[float]:
        labels = torch.full((len(candidates), max(map(len, candidates))), -100, dtype=torch.long)
        for j, ids in enumerate(candidates):
            labels[j, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        labels = labels.to(self.device)
        index = torch.tensor(owners, device=self.device)
        decoder_ids = self.model._shift_right(labels)  # what `labels=` does, without computing a loss
        logits = self.decoder.teacher_forced(hidden, mask, index, decoder_ids)
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        picked = log_probs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return torch.where(labels != -100, picked, 0.0).sum(dim=-1).tolist()

    def warmup(self) -> None:
        row = Row(
            prompt=torch.zeros(1, self.d_model, device=self.device, dtype=self.dtype), input_ids=[self.eos_token_id]
        )
        self.generate([row], Decoding(), [2])
        self.score([row], [[[self.eos_token_id]]])
