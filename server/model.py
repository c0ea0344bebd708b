"""`FrozenT5`: the resident base model and the row layout that makes mixed-task batches exact.

Each row is `[prompt_i ; embed(input_i) incl. </s> ; pad...]`, right-padded, with an attention mask of
ones over its `P_i + L_i` positions that is also used for decoder cross-attention. T5 has only relative
positions, so a row's outputs do not depend on the other rows of its batch.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoTokenizer,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedTokenizerBase,
    T5ForConditionalGeneration,
)
from transformers.modeling_outputs import BaseModelOutput

from server.tiny import build_tiny_t5

log = logging.getLogger(__name__)

TINY = "tiny"


@dataclass(frozen=True)
class Row:
    """One batch row: a prompt already on the model's device and dtype, and its input token ids."""

    prompt: torch.Tensor
    input_ids: list[int]

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


@dataclass(frozen=True)
class Generation:
    token_ids: list[int]
    text: str
    finish_reason: str  # "eos" | "length"


class SuppressUndecodable(LogitsProcessor):
    """Bans ids past the tokenizer (T5 checkpoints pad the embedding matrix past the vocabulary)."""

    def __init__(self, first_invalid_id: int) -> None:
        self.first_invalid_id = first_invalid_id

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores[:, self.first_invalid_id :] = float("-inf")
        return scores


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


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
        self.decodable_vocab = min(len(tokenizer), config.vocab_size)
        self._embed = self.model.get_input_embeddings()
        self._processors = LogitsProcessorList()
        if self.decodable_vocab < config.vocab_size:
            self._processors.append(SuppressUndecodable(self.decodable_vocab))

    @classmethod
    def load(cls, name: str, device: str = "auto", dtype: str = "auto") -> FrozenT5:
        """Loads `tiny`, a local checkpoint directory, or a hub id (safetensors preferred)."""
        target = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, target)
        if name == TINY:
            model, tokenizer = build_tiny_t5()
        else:
            source = str(Path(name)) if Path(name).is_dir() else name
            tokenizer = AutoTokenizer.from_pretrained(source)
            model = T5ForConditionalGeneration.from_pretrained(source, dtype=torch_dtype)
        log.info("loaded %s on %s as %s", name, target, torch_dtype)
        return cls(model, tokenizer, name, target, torch_dtype)

    def use_cpu_threads(self, threads: int) -> None:
        """On CPU, sets torch's threads; 0 keeps one per core (the most throughput on a machine the server
        owns). On a small shared machine, intra-op threads competing with the HTTP loop and other processes
        make calls slower and their latency erratic; fewer threads trade throughput for steadier latency.
        Nothing to do on CUDA."""
        if self.device.type == "cpu":
            torch.set_num_threads(threads or os.cpu_count() or 1)

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
        hidden = self.model.encoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        return hidden, mask

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
    def generate(self, rows: list[Row], decoding: Decoding, max_new_tokens: list[int]) -> list[Generation]:
        embeds, mask = self.layout(rows)
        config = GenerationConfig(
            max_new_tokens=max(max_new_tokens),
            num_beams=decoding.num_beams,
            do_sample=decoding.do_sample,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            decoder_start_token_id=self.model.config.decoder_start_token_id,
            **({"temperature": decoding.temperature, "top_p": decoding.top_p} if decoding.do_sample else {}),
        )
        with torch.random.fork_rng(devices=self._rng_devices(), enabled=decoding.seed is not None):
            if decoding.seed is not None:
                torch.manual_seed(decoding.seed)
            sequences = self.model.generate(
                inputs_embeds=embeds,
                attention_mask=mask,
                generation_config=config,
                logits_processor=self._processors,
            )
        return [self._finish(seq[1:].tolist(), limit) for seq, limit in zip(sequences, max_new_tokens, strict=True)]

    def _rng_devices(self) -> list[torch.device]:
        return [self.device] if self.device.type == "cuda" else []

    def _finish(self, tokens: list[int], max_new_tokens: int) -> Generation:
        tokens = tokens[:max_new_tokens]
        if self.eos_token_id in tokens:
            end = tokens.index(self.eos_token_id)
            text_ids, kept, reason = tokens[:end], tokens[: end + 1], "eos"
        else:
            text_ids, kept, reason = tokens, tokens, "length"
        text = self.tokenizer.decode(text_ids, skip_special_tokens=True)
        return Generation(token_ids=kept, text=text, finish_reason=reason)

    @torch.inference_mode()
    def score(self, rows: list[Row], targets: list[list[list[int]]]) -> list[list[float]]:
        """Summed log-probability of each row's candidate targets (token ids incl. EOS).

        The encoder runs once per row; every candidate of a row reuses that row's encoder output.
        """
        hidden, mask = self.encode(rows)
        owner = [i for i, candidates in enumerate(targets) for _ in candidates]
        flat = [ids for candidates in targets for ids in candidates]
        labels = torch.full((len(flat), max(map(len, flat))), -100, dtype=torch.long)
        for j, ids in enumerate(flat):
            labels[j, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        labels = labels.to(self.device)
        index = torch.tensor(owner, device=self.device)
        out = self.model(
            encoder_outputs=BaseModelOutput(last_hidden_state=hidden[index]),
            attention_mask=mask[index],
            labels=labels,
        )
        log_probs = torch.log_softmax(out.logits.float(), dim=-1)
        picked = log_probs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        sums = (picked * (labels != -100)).sum(dim=-1).tolist()
        result, cursor = [], 0
        for candidates in targets:
            result.append(sums[cursor : cursor + len(candidates)])
            cursor += len(candidates)
        return result

    def warmup(self) -> None:
        row = Row(
            prompt=torch.zeros(1, self.d_model, device=self.device, dtype=self.dtype), input_ids=[self.eos_token_id]
        )
        self.generate([row], Decoding(), [2])
        self.score([row], [[[self.eos_token_id]]])
