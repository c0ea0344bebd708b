"""`PromptTrainer`: prompt tuning (Lester et al. 2021) of one `[P, d_model]` tensor over a `FrozenT5`.

The base model is never unfrozen, switched to train mode or written to: the only tensor with gradients is
the prompt (a float32 leaf on the model's device, cast to the model dtype in the forward pass). Training
rows use the serving layout, `[prompt ; embed(input) incl. </s> ; pad]` with the mask over `P + L`
positions, built with `torch.cat` (one prompt length per batch, so no per-row copies are needed), so a
prompt is trained on exactly what `/v1/generate` and `/v1/classify` will feed the model.

Batch order is a pure function of `(seed, step)`: epoch `e` visits the train set in a permutation drawn
from a generator seeded by `(seed, e)`. A checkpoint therefore needs only the step (plus prompt and
optimizer state) to continue the exact same run; it records a digest of the tokenized train set so a
resume over different data is refused instead of silently diverging.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from prompt_store import SoftPrompt, validate_prompt
from prompt_store.atomic import write_atomically
from server.serving.model import Decoding, FrozenT5, Row
from server.training.recipe import MAX_RANK_LABELS, RANDOM_INIT_RANGE, VOCAB_INIT_TOP_IDS, TrainingConfig

IGNORE_INDEX = -100
CHECKPOINT_FORMAT = 1


@dataclass(frozen=True)
class TrainingExample:
    input: str
    target: str


ExampleLike = TrainingExample | Mapping[str, str] | tuple[str, str]
ProgressCallback = Callable[[int, float, dict[str, float] | None], None]
StopSignal = threading.Event | Callable[[], bool]


def as_examples(items: Iterable[ExampleLike] | None) -> list[TrainingExample]:
    """Accepts `TrainingExample`s, `{"input": ..., "target": ...}` mappings or `(input, target)` pairs."""
    examples = []
    for item in items or []:
        if isinstance(item, TrainingExample):
            examples.append(item)
        elif isinstance(item, Mapping):
            examples.append(TrainingExample(input=str(item["input"]), target=str(item["target"])))
        else:
            source, target = item
            examples.append(TrainingExample(input=str(source), target=str(target)))
    return examples


class TrainingDiverged(ValueError):
    """The loss, the prompt or an eval value stopped being finite: nothing after this step can be trusted,
    and NaN/infinity cannot be stored in a job record (JSON has no such numbers)."""

    def __init__(self, step: int, what: str) -> None:
        super().__init__(f"the {what} became non-finite at step {step}; lower learning_rate")
        self.step = step


def _all_finite(values: Iterable[float]) -> bool:
    return all(math.isfinite(value) for value in values)


class TrainingCancelled(Exception):
    """Raised by `PromptTrainer.train` when its stop signal is set; `step` is the last completed step."""

    def __init__(self, step: int) -> None:
        super().__init__(f"training cancelled after step {step}")
        self.step = step


@dataclass(frozen=True)
class Batch:
    """One training batch, built on the CPU, then moved to the model's device in one go.

    `input_ids`: right-padded input ids (`</s>` included) and `input_mask` their mask; `labels`: target ids
    (`</s>` included), -100 past each target's end. The derived tensors are computed here, on the CPU, so
    the training step launches no work for them and never waits on the device to learn how many target
    tokens there are: `decoder_input_ids` (labels shifted right behind the start token, padded),
    `target_index` (flat positions of the real target tokens) and `target_ids` (their ids).
    """

    input_ids: torch.Tensor
    input_mask: torch.Tensor
    labels: torch.Tensor
    decoder_input_ids: torch.Tensor
    target_index: torch.Tensor
    target_ids: torch.Tensor

    @classmethod
    def build(
        cls,
        input_ids: torch.Tensor,
        input_mask: torch.Tensor,
        labels: torch.Tensor,
        decoder_start_token_id: int,
        pad_token_id: int,
    ) -> Batch:
        labels = labels.to("cpu")
        start = torch.full_like(labels[:, :1], decoder_start_token_id)
        shifted = torch.cat([start, labels[:, :-1]], dim=1)
        decoder_input_ids = shifted.masked_fill(shifted == IGNORE_INDEX, pad_token_id)
        flat = labels.flatten()
        target_index = (flat != IGNORE_INDEX).nonzero().squeeze(1)
        return cls(input_ids, input_mask, labels, decoder_input_ids, target_index, flat[target_index])

    def to(self, device: torch.device) -> Batch:
        return Batch(*(getattr(self, f.name).to(device, non_blocking=True) for f in fields(self)))


@dataclass
class TrainingCheckpoint:
    """Everything a job needs to resume: prompt, optimizer state, step, sampler position and best-so-far.

    Serialized with `torch.save` and read back with `weights_only=True` (tensors and plain containers only),
    so loading a checkpoint cannot run code.
    """

    step: int
    prompt: torch.Tensor
    optimizer: dict[str, Any]
    sampler: dict[str, Any]
    config: dict[str, Any]
    fingerprint: dict[str, Any]
    losses: list[float]
    history: list[dict[str, Any]]
    best_prompt: torch.Tensor | None = None
    best_step: int | None = None
    best_eval: dict[str, float] | None = None
    evals_since_best: int = 0
    # An ensemble job's members trained before this one (`server.training.ensemble`); empty for one prompt.
    finished_members: list[dict[str, Any]] = field(default_factory=list)
    format: int = CHECKPOINT_FORMAT

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        torch.save(self.__dict__, buffer)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> TrainingCheckpoint:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"unsupported checkpoint format {state.get('format')!r}")
        return cls(**state)

    def save(self, path: str | Path) -> None:
        """Writes atomically (temp file, fsync, rename): a crash leaves the previous checkpoint intact."""
        write_atomically(Path(path), self.to_bytes())

    @classmethod
    def load(cls, path: str | Path) -> TrainingCheckpoint:
        return cls.from_bytes(Path(path).read_bytes())


CheckpointCallback = Callable[[TrainingCheckpoint], None]


@dataclass
class TrainingResult:
    prompt: SoftPrompt  # the best prompt by eval accuracy (ties: eval loss); the last one without an eval set
    best_step: int
    best_eval: dict[str, float] | None
    history: list[dict[str, Any]]  # {"step", "loss" (mean train loss since the previous entry), "eval"}
    losses: list[float]  # the train loss of every step, in order
    steps_run: int
    stopped_early: bool
    labels: list[str] = field(default_factory=list)


def derive_seed(seed: int, *stream: int) -> int:
    """Independent 63-bit seeds per purpose (init, epoch e of the sampler) from the one config seed."""
    return int(np.random.SeedSequence([seed, *stream]).generate_state(1, dtype=np.uint64)[0] >> 1)


_INIT_STREAM = 1
_SAMPLER_STREAM = 2


@lru_cache(maxsize=4)
def _epoch_permutation(seed: int, size: int, epoch: int) -> tuple[int, ...]:
    generator = torch.Generator().manual_seed(derive_seed(seed, _SAMPLER_STREAM, epoch))
    return tuple(torch.randperm(size, generator=generator).tolist())


def _truncate(ids: list[int], limit: int, eos: int) -> list[int]:
    """Keeps at most `limit` tokens, the final `</s>` included (the model always sees an end of sequence)."""
    if len(ids) <= limit:
        return list(ids)
    return [*ids[: limit - 1], eos] if limit > 1 else [eos]


def _is_set(signal: StopSignal | None) -> bool:
    if signal is None:
        return False
    if isinstance(signal, threading.Event):
        return signal.is_set()
    return bool(signal())


class PromptTrainer:
    """Tunes one soft prompt on (input, target) pairs over a frozen T5. Not thread-safe: one run at a time."""

    def __init__(
        self,
        model: FrozenT5,
        train: Iterable[ExampleLike],
        eval: Iterable[ExampleLike] | None = None,
        config: TrainingConfig | None = None,
        *,
        initial_prompt: torch.Tensor | None = None,
        source_prompt: torch.Tensor | None = None,
    ) -> None:
        self.model = model
        self.source_prompt = source_prompt  # init=task: the source task's prompt, of any length
        self.config = config or TrainingConfig()
        self.train_examples = as_examples(train)
        self.eval_examples = as_examples(eval)
        if not self.train_examples:
            raise ValueError("the train set is empty")
        cfg, eos = self.config, model.eos_token_id
        self._embed = model.model.get_input_embeddings()
        model_config = model.model.config
        # transformers 5 names it `scale_decoder_outputs`; in 4.x a tied lm_head implied the scaling.
        self._scale_decoder_outputs = bool(
            getattr(model_config, "scale_decoder_outputs", model_config.tie_word_embeddings)
        )

        self._train_inputs = self._tokenize([e.input for e in self.train_examples], cfg.max_input_tokens)
        self._train_targets = self._tokenize([e.target for e in self.train_examples], cfg.max_target_tokens)
        self._eval_inputs = self._tokenize([e.input for e in self.eval_examples], cfg.max_input_tokens)
        self._eval_targets = self._tokenize([e.target for e in self.eval_examples], cfg.max_target_tokens)
        self._eval_texts = [model.tokenizer.decode(ids[:-1], skip_special_tokens=True) for ids in self._eval_targets]

        self.labels = list(dict.fromkeys(e.target for e in self.train_examples))
        self._label_ids = [_truncate(ids, cfg.max_target_tokens, eos) for ids in model.tokenize(self.labels)]
        self.eval_metric = self._resolve_eval_metric()
        self.data_sha256 = hashlib.sha256(
            json.dumps([self._train_inputs, self._train_targets], separators=(",", ":")).encode()
        ).hexdigest()

        init = self.initial_prompt() if initial_prompt is None else initial_prompt.detach()
        if tuple(init.shape) != (cfg.prompt_length, model.d_model):
            raise ValueError(
                f"initial prompt has shape {list(init.shape)}; expected [{cfg.prompt_length}, {model.d_model}]"
            )
        self.prompt = torch.nn.Parameter(init.to(device=model.device, dtype=torch.float32).clone())
        # Imported here: `transformers.optimization` imports its trainer's utilities, and those import PEFT where it is
        # installed, about 3 s of every server process's start-up for a module only a training job needs.
        from transformers.optimization import Adafactor

        self.optimizer = Adafactor([self.prompt], **cfg.adafactor_kwargs())
        self._prompt_mask: dict[tuple[int, int], torch.Tensor] = {}
        self.step = 0
        self.losses: list[float] = []
        self.history: list[dict[str, Any]] = []
        self.best_prompt: torch.Tensor | None = None
        self.best_step: int | None = None
        self.best_eval: dict[str, float] | None = None
        self.evals_since_best = 0

    # ----------------------------------------------------------------------------------------- data

    def _tokenize(self, texts: list[str], limit: int) -> list[list[int]]:
        if not texts:
            return []
        return [_truncate(ids, limit, self.model.eos_token_id) for ids in self.model.tokenize(texts)]

    def _resolve_eval_metric(self) -> str:
        closed = 2 <= len(self.labels) <= MAX_RANK_LABELS and all(e.target in self.labels for e in self.eval_examples)
        metric = self.config.eval_metric
        if metric == "auto":
            return "rank_accuracy" if closed else "exact_match"
        if metric == "rank_accuracy" and not closed:
            raise ValueError(
                f"eval_metric='rank_accuracy' needs 2..{MAX_RANK_LABELS} distinct train targets "
                "and every eval target among them"
            )
        return metric

    def batch_indices(self, step: int) -> list[int]:
        """Train-set indices of 0-based step `step`: consecutive slices of per-epoch seeded permutations."""
        size, batch_size = len(self.train_examples), self.config.batch_size
        position, indices = step * batch_size, []
        while len(indices) < batch_size:
            epoch, offset = divmod(position, size)
            take = min(batch_size - len(indices), size - offset)
            indices.extend(_epoch_permutation(self.config.seed, size, epoch)[offset : offset + take])
            position += take
        return indices

    def collate(self, inputs: Sequence[list[int]], targets: Sequence[list[int]]) -> Batch:
        width, depth = max(map(len, inputs)), max(map(len, targets))
        input_ids = torch.full((len(inputs), width), self.model.pad_token_id, dtype=torch.long)
        input_mask = torch.zeros((len(inputs), width), dtype=torch.long)
        labels = torch.full((len(targets), depth), IGNORE_INDEX, dtype=torch.long)
        for i, (source, target) in enumerate(zip(inputs, targets, strict=True)):
            input_ids[i, : len(source)] = torch.tensor(source)
            input_mask[i, : len(source)] = 1
            labels[i, : len(target)] = torch.tensor(target)
        return self.make_batch(input_ids, input_mask, labels)

    def make_batch(self, input_ids: torch.Tensor, input_mask: torch.Tensor, labels: torch.Tensor) -> Batch:
        """A `Batch` on the model's device from CPU tensors (right-padded ids, mask, labels with -100)."""
        start_id = self.model.model.config.decoder_start_token_id
        return Batch.build(input_ids, input_mask, labels, start_id, self.model.pad_token_id).to(self.model.device)

    def batch(self, step: int) -> Batch:
        indices = self.batch_indices(step)
        return self.collate([self._train_inputs[i] for i in indices], [self._train_targets[i] for i in indices])

    # ----------------------------------------------------------------------------------------- init

    def initial_prompt(self) -> torch.Tensor:
        """The config's init as a float32 CPU `[P, d]` tensor; deterministic in `config.seed`.

        class_labels: slot i holds the mean token embedding (without `</s>`) of the i-th distinct train target
        (first-seen order, up to 32 labels), the other slots are sampled like `vocab`: distinct ids drawn from
        the 5,000 lowest (the most frequent pieces of a SentencePiece vocabulary; every decodable id of a
        smaller one). random: uniform [-0.5, 0.5]. text: `init_text`'s token embeddings, repeated to length.
        task: the source prompt's first P rows; a shorter source is followed by rows sampled like `vocab`.
        """
        cfg = self.config
        length, generator = cfg.prompt_length, torch.Generator().manual_seed(derive_seed(cfg.seed, _INIT_STREAM))
        if cfg.init == "random":
            return (torch.rand(length, self.model.d_model, generator=generator) * 2 - 1) * RANDOM_INIT_RANGE
        if cfg.init == "text":
            ids = [i for i in self.model.tokenize([cfg.init_text or ""])[0] if i != self.model.eos_token_id]
            if not ids:
                raise ValueError("init_text has no tokens")
            return self._embedding_rows((ids * math.ceil(length / len(ids)))[:length])
        if cfg.init == "task":
            return self._transferred(length, generator)
        slots: list[torch.Tensor] = []
        # Free-text targets are no label set: class_labels then samples every slot, as `vocab` does.
        if cfg.init == "class_labels" and len(self.labels) <= MAX_RANK_LABELS:
            for ids in self._label_ids[:length]:
                ids = [i for i in ids if i != self.model.eos_token_id]
                if ids:
                    slots.append(self._embedding_rows(ids).mean(dim=0, keepdim=True))
        rest = self._embedding_rows(self._sample_vocab_ids(length - len(slots), generator))
        return torch.cat([*slots, rest], dim=0)

    def _transferred(self, length: int, generator: torch.Generator) -> torch.Tensor:
        source = self.source_prompt
        if source is None:
            raise ValueError("init='task' needs the source task's prompt")
        if source.ndim != 2 or source.shape[1] != self.model.d_model:
            raise ValueError(f"the source prompt has shape {list(source.shape)}; its rows must be d_model wide")
        kept = source.detach().to("cpu", torch.float32)[:length]
        return torch.cat([kept, self._embedding_rows(self._sample_vocab_ids(length - kept.shape[0], generator))])

    def _sample_vocab_ids(self, count: int, generator: torch.Generator) -> list[int]:
        top = min(VOCAB_INIT_TOP_IDS, self.model.decodable_vocab)
        if count <= top:
            return torch.randperm(top, generator=generator)[:count].tolist()
        return torch.randint(top, (count,), generator=generator).tolist()

    def _embedding_rows(self, ids: list[int]) -> torch.Tensor:
        index = torch.tensor(ids, dtype=torch.long, device=self._embed.weight.device)
        return self._embed.weight.detach()[index].to("cpu", torch.float32)

    # ----------------------------------------------------------------------------------------- model

    def layout(self, prompt: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """`inputs_embeds` and mask by the serving row layout, differentiable in `prompt`."""
        rows, length = batch.input_ids.shape[0], prompt.shape[0]
        prompt_rows = prompt.to(self.model.dtype).unsqueeze(0).expand(rows, -1, -1)
        embeds = torch.cat([prompt_rows, self._embed(batch.input_ids)], dim=1)
        ones = self._prompt_mask.get((rows, length))
        if ones is None:
            ones = torch.ones(rows, length, dtype=batch.input_mask.dtype, device=batch.input_mask.device)
            self._prompt_mask[(rows, length)] = ones
        return embeds, torch.cat([ones, batch.input_mask], dim=1)

    def decoder_states(self, prompt: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Final decoder states `[B, T, d]` under teacher forcing, scaled as T5 scales them before `lm_head`."""
        t5 = self.model.model
        embeds, mask = self.layout(prompt, batch)
        encoded = t5.encoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        states = t5.decoder(
            input_ids=batch.decoder_input_ids,
            encoder_hidden_states=encoded,
            encoder_attention_mask=mask,
            use_cache=False,
        ).last_hidden_state
        if self._scale_decoder_outputs:
            states = states * (self.model.d_model**-0.5)
        return states

    def loss(self, batch: Batch, prompt: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
        """T5's token cross-entropy on the targets (incl. `</s>`), in float32 whatever the model dtype.

        Same value as `T5ForConditionalGeneration(labels=...)`, but `lm_head` and the softmax run only on
        target positions, not on the padding of shorter targets (with a 32k vocabulary, that is real work).
        """
        states = self.decoder_states(self.prompt if prompt is None else prompt, batch)
        picked = states.flatten(0, 1).index_select(0, batch.target_index)
        logits = self.model.model.lm_head(picked)
        return F.cross_entropy(logits.float(), batch.target_ids, reduction=reduction)

    def train_step(self, batch: Batch) -> float:
        """One optimizer step on `batch`; returns its loss. Raises `TrainingDiverged` (with the number this
        step will have) when the loss or the updated prompt is not finite."""
        self.optimizer.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = self.loss(batch)
            loss.backward()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise TrainingDiverged(self.step + 1, "loss")
        self.optimizer.step()
        if not bool(torch.isfinite(self.prompt).all()):
            raise TrainingDiverged(self.step + 1, "prompt")
        return value

    # ----------------------------------------------------------------------------------------- eval

    @torch.no_grad()
    def evaluate(self, prompt: torch.Tensor | None = None) -> dict[str, float]:
        """Eval-set metrics: `accuracy` (the selected metric), `exact_match`, `rank_accuracy`, `loss`.

        `exact_match`: greedy generation equals the (truncated) target. `rank_accuracy` (only when the train
        targets form a label set of 2..32 and every eval target is one of them): the label with the highest
        summed log-probability, as `/v1/classify` decides, is the target. `loss`: per-token cross-entropy.
        """
        if not self.eval_examples:
            return {}
        prompt = (self.prompt if prompt is None else prompt).detach()
        on_device = self.model.prompt_on_device(prompt)
        chunk = max(self.config.batch_size, 32)
        exact = ranked = 0
        loss_sum, tokens = 0.0, 0
        rank = self.eval_metric == "rank_accuracy"
        for start in range(0, len(self.eval_examples), chunk):
            part = range(start, min(start + chunk, len(self.eval_examples)))
            rows = [Row(prompt=on_device, input_ids=self._eval_inputs[i]) for i in part]
            generations = self.model.generate(rows, Decoding(), [self.config.max_target_tokens] * len(rows))
            exact += sum(g.text == self._eval_texts[i] for g, i in zip(generations, part, strict=True))
            if rank:
                scores = self.model.score(rows, [self._label_ids] * len(rows))
                for row_scores, i in zip(scores, part, strict=True):
                    best = max(range(len(row_scores)), key=row_scores.__getitem__)
                    ranked += self.labels[best] == self.eval_examples[i].target
            batch = self.collate([self._eval_inputs[i] for i in part], [self._eval_targets[i] for i in part])
            loss_sum += float(self.loss(batch, prompt, reduction="sum"))
            tokens += batch.target_ids.numel()
        count = len(self.eval_examples)
        metrics = {"exact_match": exact / count, "loss": loss_sum / max(tokens, 1)}
        if rank:
            metrics["rank_accuracy"] = ranked / count
        metrics["accuracy"] = metrics[self.eval_metric]
        return metrics

    def _improves(self, metrics: dict[str, float]) -> bool:
        if self.best_eval is None:
            return True
        best = self.best_eval
        return metrics["accuracy"] > best["accuracy"] or (
            metrics["accuracy"] == best["accuracy"] and metrics["loss"] < best["loss"]
        )

    # ----------------------------------------------------------------------------------------- state

    def fingerprint(self) -> dict[str, Any]:
        return {"model_id": self.model.model_id, "d_model": self.model.d_model}

    def checkpoint(self) -> TrainingCheckpoint:
        return TrainingCheckpoint(
            step=self.step,
            prompt=self.prompt.detach().to("cpu").clone(),
            optimizer=_to_cpu(self.optimizer.state_dict()),
            sampler={
                "kind": "epoch_permutation",
                "seed": self.config.seed,
                "examples_seen": self.step * self.config.batch_size,
                "data_sha256": self.data_sha256,
            },
            config=self.config.model_dump(),
            fingerprint=self.fingerprint(),
            losses=list(self.losses),
            history=json.loads(json.dumps(self.history)),
            best_prompt=None if self.best_prompt is None else self.best_prompt.to("cpu").clone(),
            best_step=self.best_step,
            best_eval=None if self.best_eval is None else dict(self.best_eval),
            evals_since_best=self.evals_since_best,
        )

    def restore(self, checkpoint: TrainingCheckpoint) -> None:
        """Continues from `checkpoint`; refuses one from another config, model width or train set."""
        if _with_defaults(checkpoint.config) != self.config.model_dump():
            raise ValueError("the checkpoint was made with a different training config")
        if checkpoint.fingerprint.get("d_model") != self.model.d_model:
            raise ValueError("the checkpoint was made for a model of another d_model")
        if checkpoint.sampler.get("data_sha256") != self.data_sha256:
            raise ValueError("the checkpoint was made on a different train set")
        if tuple(checkpoint.prompt.shape) != tuple(self.prompt.shape):
            raise ValueError(f"checkpoint prompt has shape {list(checkpoint.prompt.shape)}")
        with torch.no_grad():
            self.prompt.copy_(checkpoint.prompt)
        self.optimizer.load_state_dict(checkpoint.optimizer)
        self.step = checkpoint.step
        self.losses = list(checkpoint.losses)
        self.history = json.loads(json.dumps(checkpoint.history))
        best = checkpoint.best_prompt
        self.best_prompt = None if best is None else best.to(self.prompt.device, torch.float32).clone()
        self.best_step = checkpoint.best_step
        self.best_eval = None if checkpoint.best_eval is None else dict(checkpoint.best_eval)
        self.evals_since_best = checkpoint.evals_since_best

    # ----------------------------------------------------------------------------------------- loop

    def train(
        self,
        *,
        on_progress: ProgressCallback | None = None,
        should_stop: StopSignal | None = None,
        checkpoint_every: int | None = None,
        on_checkpoint: CheckpointCallback | None = None,
        resume_from: TrainingCheckpoint | None = None,
    ) -> TrainingResult:
        """Runs to `config.steps` (or early stop) and returns the best prompt and the history.

        `on_progress(step, loss, eval)` runs after every step (`eval` is None except at evaluation steps).
        `should_stop` (an Event or a callable) is checked before every step; when set, `TrainingCancelled`
        is raised. A non-finite loss, prompt or eval value raises `TrainingDiverged`. `on_checkpoint` receives a `TrainingCheckpoint` every `checkpoint_every` steps; passing
        one back as `resume_from` (to a trainer built on the same data and config) continues the same run.
        """
        cfg = self.config
        if resume_from is not None:
            self.restore(resume_from)
        stopped_early = False
        while self.step < cfg.steps and not stopped_early:
            if _is_set(should_stop):
                raise TrainingCancelled(self.step)
            loss = self.train_step(self.batch(self.step))
            self.step += 1
            self.losses.append(loss)
            metrics = None
            if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                metrics = self.evaluate() or None
                if metrics is not None and not _all_finite(metrics.values()):
                    raise TrainingDiverged(self.step, "eval loss")
                stopped_early = self._record(metrics)
            if on_progress is not None:
                on_progress(self.step, loss, metrics)
            if (
                on_checkpoint is not None
                and checkpoint_every
                and self.step % checkpoint_every == 0
                and self.step < cfg.steps
                and not stopped_early
            ):
                on_checkpoint(self.checkpoint())
        return self._result(stopped_early)

    def _record(self, metrics: dict[str, float] | None) -> bool:
        """Adds a history entry, tracks the best prompt; True when patience is exhausted."""
        since = self.history[-1]["step"] if self.history else 0
        window = self.losses[since : self.step]
        self.history.append({"step": self.step, "loss": sum(window) / len(window), "eval": metrics})
        if metrics is None:
            return False
        if self._improves(metrics):
            self.best_prompt = self.prompt.detach().clone()
            self.best_step, self.best_eval, self.evals_since_best = self.step, dict(metrics), 0
            return False
        self.evals_since_best += 1
        return self.config.patience is not None and self.evals_since_best >= self.config.patience

    def _result(self, stopped_early: bool) -> TrainingResult:
        if self.best_prompt is None:
            tensor, best_step = self.prompt.detach(), self.step
        else:
            tensor, best_step = self.best_prompt, self.best_step or self.step
        prompt = validate_prompt(tensor.to("cpu"), self.model.d_model, max_length=self.config.prompt_length)
        return TrainingResult(
            prompt=prompt,
            best_step=best_step,
            best_eval=self.best_eval,
            history=json.loads(json.dumps(self.history)),
            losses=list(self.losses),
            steps_run=self.step,
            stopped_early=stopped_early,
            labels=list(self.labels),
        )


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu").clone()
    if isinstance(value, dict):
        return {key: _to_cpu(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_to_cpu(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_to_cpu(item) for item in value)
    return value


def _with_defaults(config: dict[str, Any]) -> dict[str, Any] | None:
    """A checkpoint's stored config as today's `TrainingConfig` reads it: one written before a field existed
    has that field's default (so it still resumes); None when it no longer reads."""
    try:
        return TrainingConfig.model_validate(config).model_dump()
    except ValueError:
        return None
