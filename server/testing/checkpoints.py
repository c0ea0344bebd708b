"""Random T5 checkpoints written with `save_pretrained`, to test the real loading path offline."""

from __future__ import annotations

from pathlib import Path

from transformers import T5Config

from server.serving.tiny import build_tiny_t5


def t5_small_config() -> T5Config:
    """t5-small-lm-adapt's shapes (vocab 32128, d_model 512, 8+8 layers, 6 heads, gated-gelu)."""
    return T5Config(
        vocab_size=32128,
        d_model=512,
        d_kv=64,
        d_ff=1024,
        num_layers=8,
        num_decoder_layers=8,
        num_heads=6,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )


def save_checkpoint(config: T5Config, directory: Path) -> Path:
    """Saves a random T5 (own lm_head) with the ByT5 tokenizer, as a hub checkpoint would be laid out."""
    model, tokenizer = build_tiny_t5(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
