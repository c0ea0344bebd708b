"""The built-in `tiny` model: a small random T5 with the byte-level ByT5 tokenizer, built offline.

It is deterministic (fixed seeds) and not degenerate: a freshly built T5 ties `lm_head` to the input
embeddings and then repeats the decoder start token forever, so it gets an `lm_head` of its own,
scaled so that logits are far from flat. Greedy outputs then vary with the input and the prompt.
"""

from __future__ import annotations

import copy

import torch
from transformers import ByT5Tokenizer, T5Config, T5ForConditionalGeneration

TINY_SEED = 0
LM_HEAD_SCALE = 0.5


def tiny_config() -> T5Config:
    return T5Config(
        vocab_size=259,  # the ByT5 bytes and specials; no sentinel ids, so outputs are visible text
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )


def build_tiny_t5(config: T5Config | None = None) -> tuple[T5ForConditionalGeneration, ByT5Tokenizer]:
    """Builds the preset (or a random T5 of another `config`) with the ByT5 tokenizer."""
    # A copy: the caller's config stays as given (it is changed below, and a second build must match the first).
    config = copy.deepcopy(config) if config is not None else tiny_config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = T5ForConditionalGeneration(config)
    generator = torch.Generator().manual_seed(TINY_SEED + 1)
    head = torch.randn(config.vocab_size, config.d_model, generator=generator) * LM_HEAD_SCALE
    model.lm_head.weight = torch.nn.Parameter(head)
    model.config.tie_word_embeddings = False
    return model.eval(), ByT5Tokenizer()
