"""`LeanEncoder`: a frozen T5's encoder pass without `transformers`' per-call machinery.

Every row that joins the engine, every classify and embedding row, is one encoder pass. Through `transformers`
a pass runs each block's modules, their wrappers and the mask and position-bias builders in Python: on a small
model that is most of the engine's time for short requests, and on a GPU it is launch overhead. Here a pass is
the position bias, built once, and per block a fused query-key-value projection, one attention call and the
feed-forward.

Numerics follow `transformers`' T5 encoder (RMS norm in fp32, no attention scaling, softmax over biased scores,
padded keys masked), so a row's encoder output matches it within rounding (tests/test_mixed_batch.py).
"""

from __future__ import annotations

import torch
from transformers import T5ForConditionalGeneration

from server.serving.decoder import LeanStack, additive_mask, feed_forward_weights


class _EncoderBlock:
    """One encoder block's weights, the query, key and value projections fused."""

    def __init__(self, block: torch.nn.Module) -> None:
        self_attention, ff = block.layer
        attention = self_attention.SelfAttention
        self.self_norm = self_attention.layer_norm.weight
        self.self_qkv = torch.cat([attention.q.weight, attention.k.weight, attention.v.weight])
        self.self_out = attention.o.weight
        self.ff_norm = ff.layer_norm.weight
        self.ff_in, self.ff_gate, self.ff_out = feed_forward_weights(ff)


class LeanEncoder(LeanStack):
    """The encoder of a frozen `T5ForConditionalGeneration`: `encoder(embeds, mask)` is its last hidden state."""

    def __init__(self, model: T5ForConditionalGeneration) -> None:
        super().__init__(model, model.encoder)
        self.blocks = [_EncoderBlock(block) for block in model.encoder.block]

    @torch.inference_mode()
    def __call__(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`embeds` `[n, width, d_model]` (prompt and input embeddings), `mask` `[n, width]` (1 for a token, 0 for
        padding); returns `[n, width, d_model]`."""
        n, width, _ = embeds.shape
        positions = torch.arange(width, device=embeds.device)
        bias = self._position_bias(positions[None, :] - positions[:, None], bidirectional=True)  # key - query
        # [n, heads, width, width]: the bias, and each row's padding (its tokens come first) masked
        bias = bias.permute(2, 0, 1).unsqueeze(0) + additive_mask(mask.sum(dim=1), width, bias.dtype)
        x = embeds
        for block in self.blocks:
            h = self._norm(x, block.self_norm)
            q, k, v = (h @ block.self_qkv.T).view(n, width, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
            x = x + self._attend(q, k, v, bias) @ block.self_out.T
            x = x + self._feed_forward(self._norm(x, block.ff_norm), block)
        return self._norm(x, self.final_norm)
