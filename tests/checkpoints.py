"""Random T5 checkpoints for the tests (see `server.testing.checkpoints`), and a config as wide as t5-base."""

from __future__ import annotations

from transformers import T5Config

from server.serving.tiny import tiny_config
from server.testing.checkpoints import save_checkpoint, t5_small_config

__all__ = ["d768_config", "save_checkpoint", "t5_small_config"]


def d768_config() -> T5Config:
    """A small model as wide as t5-base (d_model 768), for the released prompts."""
    config = tiny_config()
    config.update({"d_model": 768, "d_kv": 64, "num_heads": 12, "d_ff": 256, "num_layers": 1, "num_decoder_layers": 1})
    return config
