"""The prompt-tuning recipe: the job's `config` (docs/api.md) and the fixed optimizer settings of the paper.

Defaults follow Lester, Al-Rfou & Constant (2021): prompt length 100, class-label init, Adafactor at a
constant learning rate of 0.3, batch 32. Only the fields a job may set live in `TrainingConfig`; the
Adafactor constants that define the recipe are fixed in `ADAFACTOR_SETTINGS`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from prompt_store.records import MAX_ENSEMBLE_SIZE, TASK_ID_PATTERN, Utf8Text

InitMethod = Literal["class_labels", "vocab", "random", "text", "task"]
EvalMetric = Literal["auto", "exact_match", "rank_accuracy"]

# Adafactor as in the paper (T5X's prompt-tuning gin): no parameter scaling, no relative step, constant lr.
ADAFACTOR_SETTINGS: dict[str, Any] = {
    "scale_parameter": False,
    "relative_step": False,
    "warmup_init": False,
    "decay_rate": -0.8,
    "clip_threshold": 1.0,
}

# The "5,000 most frequent tokens" of a SentencePiece vocabulary are its lowest ids.
VOCAB_INIT_TOP_IDS = 5000
# `init_task`: a task id, optionally pinned to a version (`sst2@3`).
INIT_TASK_PATTERN = TASK_ID_PATTERN.removesuffix("$") + r"(@[1-9][0-9]{0,17})?$"
# Uniform init range of the `random` method.
RANDOM_INIT_RANGE = 0.5
# Rank classification is used for `eval_metric="auto"` when the train targets form a label set this small.
MAX_RANK_LABELS = 32
# Ceilings of the config's counts and token limits: whatever validates is a run that can start. The server
# caps steps, prompt length, batch size and target length lower (settings); these bound the library use.
MAX_COUNT = 1_000_000_000
MAX_TOKENS = 1_000_000
MAX_LEARNING_RATE = 10.0
MAX_WEIGHT_DECAY = 1.0
MAX_SEED = 2**63 - 1
MAX_INIT_TEXT_CHARS = 1 << 20  # far more than a prompt's rows of tokens: only the start of it is used


class TrainingConfig(BaseModel):
    """A training job's `config` (docs/api.md, "Training"); unknown fields are refused so typos do not pass silently."""

    # Stored in job records, so every number must survive a JSON round trip: no NaN or infinity.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    prompt_length: int = Field(100, ge=1, le=MAX_TOKENS, description="prompt rows P")
    init: InitMethod = Field("class_labels", description="class_labels | vocab | random | text | task")
    init_text: Utf8Text | None = Field(
        None, max_length=MAX_INIT_TEXT_CHARS, description="text whose token embeddings seed the prompt (init=text)"
    )
    init_task: str | None = Field(
        None,
        pattern=INIT_TASK_PATTERN,
        description="init=task: the caller's task whose prompt the run starts from, `task` (its active version) "
        "or `task@version`",
    )
    learning_rate: float = Field(
        0.3,
        gt=0,
        le=MAX_LEARNING_RATE,
        description="constant Adafactor learning rate (at most 10: Adafactor clips each update to an RMS of "
        "1, so a step moves the prompt by about the learning rate; far above the paper's 0.3 it only diverges)",
    )
    steps: int = Field(2000, ge=1, le=MAX_COUNT, description="optimizer steps")
    batch_size: int = Field(32, ge=1, le=MAX_COUNT, description="examples per step")
    eval_every: int = Field(200, ge=1, le=MAX_COUNT, description="steps between evaluations (and at the last step)")
    max_input_tokens: int = Field(
        512, ge=1, le=MAX_TOKENS, description="inputs are truncated to this many tokens, </s> kept"
    )
    max_target_tokens: int = Field(
        16, ge=1, le=MAX_TOKENS, description="targets are truncated to this many tokens, </s> kept"
    )
    seed: int = Field(0, ge=0, le=MAX_SEED, description="seeds the init and the batch order")
    ensemble_size: int = Field(
        1,
        ge=1,
        le=MAX_ENSEMBLE_SIZE,
        description="prompts trained, one after another, with seeds seed..seed+N-1 (the same data and recipe); "
        "above 1 they become the task's ensemble",
    )
    weight_decay: float = Field(
        1e-5,
        ge=0,
        le=MAX_WEIGHT_DECAY,
        description="Adafactor weight decay: each step shrinks the prompt by a share of learning_rate x this, "
        "so that product is at most 1 (beyond, the prompt flips sign and grows every step)",
    )
    patience: int | None = Field(
        None,
        ge=1,
        le=MAX_COUNT,
        description="stop after this many evaluations without improvement (None: run all steps)",
    )
    eval_metric: EvalMetric = Field(
        "auto",
        description="what `accuracy` means: rank classification over the train labels when they form a small "
        "label set (auto), or exact-match greedy generation",
    )

    @model_validator(mode="after")
    def _init_text_given(self) -> TrainingConfig:
        if self.init == "text" and not (self.init_text and self.init_text.strip()):
            raise ValueError("init='text' needs a non-empty init_text")
        return self

    @model_validator(mode="after")
    def _init_task_given(self) -> TrainingConfig:
        if (self.init == "task") != (self.init_task is not None):
            raise ValueError("init='task' and init_task go together: init_task names the task to start from")
        return self

    @model_validator(mode="after")
    def _decay_shrinks(self) -> TrainingConfig:
        if self.learning_rate * self.weight_decay > 1:
            raise ValueError(
                "learning_rate x weight_decay must be at most 1 (the share of the prompt decayed per step)"
            )
        return self

    def init_source(self) -> tuple[str, int | None]:
        """init=task: the source task and its version (None: the task's active version)."""
        task_id, _, version = (self.init_task or "").partition("@")
        return task_id, int(version) if version else None

    @model_validator(mode="after")
    def _member_seeds_fit(self) -> TrainingConfig:
        if self.seed + self.ensemble_size - 1 > MAX_SEED:
            raise ValueError(f"the ensemble's last seed, seed + ensemble_size - 1, must be at most {MAX_SEED}")
        return self

    def member(self, index: int) -> TrainingConfig:
        """The config of an ensemble's member `index`: the same recipe with seed `seed + index`, one prompt."""
        return self.model_copy(update={"seed": self.seed + index, "ensemble_size": 1})

    def adafactor_kwargs(self) -> dict[str, Any]:
        return {"lr": self.learning_rate, "weight_decay": self.weight_decay, **ADAFACTOR_SETTINGS}
