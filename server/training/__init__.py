"""Prompt tuning: the recipe (job config) and the trainer that tunes one soft prompt over a frozen T5."""

from server.training.recipe import ADAFACTOR_SETTINGS, TrainingConfig
from server.training.trainer import (
    Batch,
    PromptTrainer,
    TrainingCancelled,
    TrainingCheckpoint,
    TrainingDiverged,
    TrainingExample,
    TrainingResult,
    as_examples,
)

__all__ = [
    "ADAFACTOR_SETTINGS",
    "Batch",
    "PromptTrainer",
    "TrainingCancelled",
    "TrainingCheckpoint",
    "TrainingConfig",
    "TrainingDiverged",
    "TrainingExample",
    "TrainingResult",
    "as_examples",
]
