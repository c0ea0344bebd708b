"""A T5 decoder step built for decoding many rows at different steps: `LeanDecoder` and its `RowCache`.

`transformers`' forward rebuilds masks and the position bias, keeps cache bookkeeping per layer and runs many
small ops per call; a decode step needs few. Here every active row owns one slot of preallocated buffers: its
cross-attention keys and values (computed once, when it joins), its self-attention keys and values (one
position more each step) and its own length. One step runs all rows together whatever their lengths: each
row's new token sits at its own position, and its position bias and mask are its own (T5 has only relative
positions, so a row's result does not depend on where its neighbours are).

Numerics follow `transformers`' T5 (RMS norm in fp32, no attention scaling, softmax over biased scores), so a
row's logits match `model.generate` within rounding and its greedy tokens are the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from transformers import T5ForConditionalGeneration
from transformers.activations import ACT2FN
from transformers.models.t5.modeling_t5 import T5Attention

GROWTH = 2  # buffers grow by this factor when a row needs more room than they have


class RowCache:
    """Per-slot decoder state for up to `rows` rows; active rows occupy slots `0..n-1` (`LeanDecoder` keeps them
    packed). Buffers grow on demand; what they hold is bounded by the scheduler's admission limits."""

    def __init__(self, layers: int, heads: int, head_dim: int, device: torch.device, dtype: torch.dtype) -> None:
        self.layers, self.heads, self.head_dim = layers, heads, head_dim
        self.device, self.dtype = device, dtype
        self.n = 0
        self.lengths = torch.zeros(0, dtype=torch.long, device=device)  # decoder tokens stored per slot
        self.encoder_lengths = torch.zeros(0, dtype=torch.long, device=device)
        self.self_kv = self._empty(0)  # [layers, 2, rows, heads, positions, head_dim]
        self.cross_kv = self._empty(0)

    def _empty(self, rows: int, positions: int = 0) -> torch.Tensor:
        shape = (self.layers, 2, rows, self.heads, positions, self.head_dim)
        return torch.zeros(shape, device=self.device, dtype=self.dtype)

    @property
    def capacity(self) -> int:
        return self.self_kv.shape[2]

    def reserve(self, rows: int, positions: int, encoder_positions: int) -> None:
        """Room for `rows` slots, `positions` decoder tokens and `encoder_positions` encoder tokens per slot."""
        rows_now, positions_now, encoder_now = self.capacity, self.self_kv.shape[4], self.cross_kv.shape[4]
        if rows <= rows_now and positions <= positions_now and encoder_positions <= encoder_now:
            return
        new_rows = max(rows, rows_now * GROWTH if rows > rows_now else rows_now)
        new_positions = max(positions, positions_now * GROWTH if positions > positions_now else positions_now)
        new_encoder = max(encoder_positions, encoder_now)
        self.self_kv = self._regrown(self.self_kv, new_rows, new_positions)
        self.cross_kv = self._regrown(self.cross_kv, new_rows, new_encoder)
        self.lengths = _resized_vector(self.lengths, new_rows)
        self.encoder_lengths = _resized_vector(self.encoder_lengths, new_rows)

    def _regrown(self, buffer: torch.Tensor, rows: int, positions: int) -> torch.Tensor:
        if buffer.shape[2] == rows and buffer.shape[4] == positions:
            return buffer
        grown = self._empty(rows, positions)
        grown[:, :, : self.n, :, : buffer.shape[4]] = buffer[:, :, : self.n]
        return grown

    def resize(self, rows: int, encoder_positions: int, positions: int) -> None:
        """Exactly this much room (the engine's scheduler decides the shape, and charges it): larger or smaller, the
        rows in place and what they hold are kept."""
        if (rows, positions, encoder_positions) == (self.capacity, self.self_kv.shape[4], self.cross_kv.shape[4]):
            return
        assert rows >= self.n, "the cache cannot drop rows in place"
        self.self_kv = self._copied_into(self.self_kv, self._empty(rows, positions))
        self.cross_kv = self._copied_into(self.cross_kv, self._empty(rows, encoder_positions))
        self.lengths = _resized_vector(self.lengths, rows)
        self.encoder_lengths = _resized_vector(self.encoder_lengths, rows)

    def _copied_into(self, buffer: torch.Tensor, resized: torch.Tensor) -> torch.Tensor:
        positions = min(buffer.shape[4], resized.shape[4])
        resized[:, :, : self.n, :, :positions] = buffer[:, :, : self.n, :, :positions]
        return resized

    @property
    def allocated_positions(self) -> int:
        """Token positions the buffers hold room for: rows x (encoder positions + decoder positions)."""
        return self.capacity * (self.self_kv.shape[4] + self.cross_kv.shape[4])

    def export_row(self, slot: int) -> RowState:
        """A copy of what one slot holds (a parked row), exactly."""
        length, encoder_length = int(self.lengths[slot]), int(self.encoder_lengths[slot])
        return RowState(
            self.self_kv[:, :, slot, :, :length].clone(), self.cross_kv[:, :, slot, :, :encoder_length].clone()
        )

    def import_row(self, state: RowState) -> int:
        """Puts a parked row back, in the next free slot (the cache must have room for it); returns the slot."""
        slot = self.n
        length, encoder_length = state.self_kv.shape[3], state.cross_kv.shape[3]
        self.reserve(slot + 1, max(self.self_kv.shape[4], length + 1), max(self.cross_kv.shape[4], encoder_length))
        self.self_kv[:, :, slot, :, :length] = state.self_kv
        self.cross_kv[:, :, slot, :, :encoder_length] = state.cross_kv
        self.lengths[slot], self.encoder_lengths[slot] = length, encoder_length
        self.n = slot + 1
        return slot

    def release(self, slots: list[int]) -> list[int]:
        """Frees `slots` and packs the survivors into `0..n-1`: rows from the tail move into the holes.

        Returns the new order: `order[new_slot] = old_slot` for every surviving slot.
        """
        gone = set(slots)
        order = [slot for slot in range(self.n) if slot not in gone]
        keep = len(order)
        holes = [slot for slot in range(keep) if slot in gone]
        movers = [slot for slot in range(keep, self.n) if slot not in gone]
        if holes:
            src = torch.tensor(movers, device=self.device)
            dst = torch.tensor(holes, device=self.device)
            for buffer in (self.self_kv, self.cross_kv):
                buffer[:, :, dst] = buffer[:, :, src]
            for vector in (self.lengths, self.encoder_lengths):
                vector[dst] = vector[src]
            order = list(range(keep))
            for hole, mover in zip(holes, movers, strict=True):
                order[hole] = mover
        self.n = keep
        return order


def _resized_vector(vector: torch.Tensor, rows: int) -> torch.Tensor:
    resized = torch.zeros(rows, dtype=vector.dtype, device=vector.device)
    kept = min(rows, vector.shape[0])
    resized[:kept] = vector[:kept]
    return resized


@dataclass(frozen=True)
class RowState:
    """One row's decoder state outside the cache: self-attention keys and values `[layers, 2, heads, length,
    head_dim]` and cross-attention keys and values `[layers, 2, heads, encoder length, head_dim]`."""

    self_kv: torch.Tensor
    cross_kv: torch.Tensor


class LeanStack:
    """What T5's encoder and decoder stacks share, as `transformers` computes it: the RMS norm, attention without
    scaling, the feed-forward, and the relative position bias (held by the first block)."""

    def __init__(self, model: T5ForConditionalGeneration, stack: torch.nn.Module) -> None:
        config = model.config
        self.heads = config.num_heads
        self.head_dim = config.d_kv
        self.eps = config.layer_norm_epsilon
        self.act = ACT2FN[config.dense_act_fn]
        first = stack.block[0].layer[0].SelfAttention
        self.position_bias = first.relative_attention_bias
        self.num_buckets = first.relative_attention_num_buckets
        self.max_distance = first.relative_attention_max_distance
        self.final_norm = stack.final_layer_norm.weight

    def _position_bias(self, relative: torch.Tensor, bidirectional: bool) -> torch.Tensor:
        """T5's learned bias for each relative position (key - query) in `relative`: `[*relative.shape, heads]`."""
        buckets = T5Attention._relative_position_bucket(
            relative, bidirectional=bidirectional, num_buckets=self.num_buckets, max_distance=self.max_distance
        )
        return self.position_bias(buckets)

    def _attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """T5 attention: no scaling, the position bias (and mask) added to the scores; one fused call. `q` is
        `[n, heads, queries, head_dim]` (or `[n, heads, head_dim]` for one query); returns `[n, queries, inner]`."""
        if q.dim() == 3:
            q = q.unsqueeze(2)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=bias, scale=1.0)
        return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], self.heads * self.head_dim)

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        if weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(weight.dtype)
        return weight * x

    def _feed_forward(self, h: torch.Tensor, block: FeedForward) -> torch.Tensor:
        hidden = self.act(h @ block.ff_in.T)
        if block.ff_gate is not None:  # gated-GELU (T5 v1.1): the activation times a second projection
            hidden = hidden * (h @ block.ff_gate.T)
        return hidden.to(block.ff_out.dtype) @ block.ff_out.T


class LeanDecoder(LeanStack):
    """The decoder of a frozen `T5ForConditionalGeneration`, run one token per row per call."""

    def __init__(self, model: T5ForConditionalGeneration) -> None:
        super().__init__(model, model.decoder)
        config = model.config
        self.model = model
        self.start_token = config.decoder_start_token_id
        self.scale_output = config.d_model**-0.5 if getattr(config, "scale_decoder_outputs", False) else None
        self.embed = model.decoder.embed_tokens
        self.blocks = [_Block.of(block) for block in model.decoder.block]
        self.lm_head = model.lm_head.weight
        self.device = self.lm_head.device
        self.dtype = self.lm_head.dtype

    def new_cache(self) -> RowCache:
        return RowCache(len(self.blocks), self.heads, self.head_dim, self.device, self.dtype)

    @torch.inference_mode()
    def join(self, cache: RowCache, hidden: torch.Tensor, mask: torch.Tensor) -> list[int]:
        """Adds rows of encoder output `[m, E, d]` (mask `[m, E]`) to the cache; returns their slots. Their
        cross-attention keys and values are computed here, once; they start at the decoder start token."""
        m, width = hidden.shape[0], hidden.shape[1]
        first = cache.n
        cache.reserve(first + m, cache.self_kv.shape[4] or 1, width)
        slots = slice(first, first + m)
        for layer, block in enumerate(self.blocks):
            keys_values = (hidden @ block.cross_kv.T).view(m, width, 2, self.heads, self.head_dim)
            cache.cross_kv[layer, :, slots, :, :width] = keys_values.permute(2, 0, 3, 1, 4)
        cache.lengths[slots] = 0
        cache.encoder_lengths[slots] = mask.sum(dim=1)
        cache.n = first + m
        return list(range(first, first + m))

    @torch.inference_mode()
    def step(self, cache: RowCache, tokens: torch.Tensor) -> torch.Tensor:
        """One decoder step for slots `0..n-1`: `tokens[i]` is slot i's newest token; returns logits `[n, vocab]`."""
        n = cache.n
        positions = cache.lengths[:n]
        longest = int(positions.max()) + 1
        cache.reserve(n, longest, cache.cross_kv.shape[4])
        encoder_width = int(cache.encoder_lengths[:n].max())
        self_bias = self._self_bias(positions, longest)  # [n, heads, 1, longest], the causal mask folded in
        cross_mask = additive_mask(cache.encoder_lengths[:n], encoder_width, self.dtype)
        rows = torch.arange(n, device=self.device)
        x = self.embed(tokens.view(n, 1))
        for layer, block in enumerate(self.blocks):
            h = self._norm(x, block.self_norm)
            q, k, v = (h @ block.self_qkv.T).view(n, 3, self.heads, self.head_dim).unbind(1)
            cache.self_kv[layer, 0, rows, :, positions] = k
            cache.self_kv[layer, 1, rows, :, positions] = v
            keys = cache.self_kv[layer, 0, :n, :, :longest]
            values = cache.self_kv[layer, 1, :n, :, :longest]
            x = x + self._attend(q, keys, values, self_bias) @ block.self_out.T
            h = self._norm(x, block.cross_norm)
            q = (h @ block.cross_q.T).view(n, self.heads, 1, self.head_dim)
            keys = cache.cross_kv[layer, 0, :n, :, :encoder_width]
            values = cache.cross_kv[layer, 1, :n, :, :encoder_width]
            x = x + self._attend(q, keys, values, cross_mask) @ block.cross_out.T
            x = x + self._feed_forward(self._norm(x, block.ff_norm), block)
        cache.lengths[:n] += 1
        x = self._norm(x, self.final_norm)
        if self.scale_output is not None:
            x = x * self.scale_output
        return (x @ self.lm_head.T)[:, 0]

    @torch.inference_mode()
    def teacher_forced(
        self, hidden: torch.Tensor, mask: torch.Tensor, owners: torch.Tensor, decoder_ids: torch.Tensor
    ) -> torch.Tensor:
        """Logits `[C, T, vocab]` of every position of `decoder_ids` `[C, T]`, each candidate decoding against
        the encoder output of row `owners[c]` (`hidden` `[m, E, d]`, `mask` `[m, E]`). Each row's
        cross-attention keys and values are computed once, whatever the number of its candidates (what
        `transformers`' forward would project again for every candidate)."""
        candidates, length = decoder_ids.shape
        width = hidden.shape[1]
        bias = self._causal_bias(length)  # [1, heads, T, T]
        cross_mask = additive_mask(mask.sum(dim=1)[owners], width, self.dtype)
        rows, slot = torch.unique(owners, return_inverse=True)  # only the rows these candidates decode against
        encoded = hidden[rows]
        x = self.embed(decoder_ids)
        for block in self.blocks:
            h = self._norm(x, block.self_norm)
            projected = (h @ block.self_qkv.T).view(candidates, length, 3, self.heads, self.head_dim)
            q, k, v = projected.permute(2, 0, 3, 1, 4)
            x = x + self._attend(q, k, v, bias) @ block.self_out.T
            h = self._norm(x, block.cross_norm)
            q = (h @ block.cross_q.T).view(candidates, length, self.heads, self.head_dim).transpose(1, 2)
            projected = (encoded @ block.cross_kv.T).view(-1, width, 2, self.heads, self.head_dim)
            keys, values = projected.permute(2, 0, 3, 1, 4)
            x = x + self._attend(q, keys[slot], values[slot], cross_mask) @ block.cross_out.T
            x = x + self._feed_forward(self._norm(x, block.ff_norm), block)
        x = self._norm(x, self.final_norm)
        if self.scale_output is not None:
            x = x * self.scale_output
        return x @ self.lm_head.T

    def _causal_bias(self, length: int) -> torch.Tensor:
        positions = torch.arange(length, device=self.device)
        relative = positions[None, :] - positions[:, None]  # key - query, [T, T]
        bias = self._position_bias(relative, bidirectional=False).permute(2, 0, 1).unsqueeze(0)  # [1, heads, T, T]
        return bias.masked_fill(relative > 0, float("-inf"))

    def _self_bias(self, positions: torch.Tensor, width: int) -> torch.Tensor:
        """T5's decoder bias for each row's query at its own position over keys `0..width-1`; keys past the
        query are masked."""
        relative = torch.arange(width, device=self.device)[None, :] - positions[:, None]  # [n, width]
        bias = self._position_bias(relative, bidirectional=False).permute(0, 2, 1).unsqueeze(2)  # [n, heads, 1, width]
        return bias.masked_fill((relative > 0)[:, None, None, :], float("-inf"))


def additive_mask(lengths: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
    """`[n, 1, 1, width]`: 0 over each row's first `lengths[i]` keys, -inf past them."""
    past = torch.arange(width, device=lengths.device)[None, :] >= lengths[:, None]
    mask = torch.zeros(past.shape, dtype=dtype, device=lengths.device).masked_fill(past, float("-inf"))
    return mask[:, None, None, :]


class FeedForward(Protocol):
    """A block's feed-forward weights (`ff_gate` in gated-GELU T5 v1.1 only)."""

    ff_in: torch.Tensor
    ff_gate: torch.Tensor | None
    ff_out: torch.Tensor


def feed_forward_weights(ff: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """`ff_in`, `ff_gate` and `ff_out` of a `T5LayerFF`."""
    dense = ff.DenseReluDense
    if hasattr(dense, "wi_0"):
        return dense.wi_0.weight, dense.wi_1.weight, dense.wo.weight
    return dense.wi.weight, None, dense.wo.weight


class _Block:
    """One decoder block's weights, fused where one matmul can do the work of several."""

    self_norm: torch.Tensor
    self_qkv: torch.Tensor
    self_out: torch.Tensor
    cross_norm: torch.Tensor
    cross_q: torch.Tensor
    cross_kv: torch.Tensor
    cross_out: torch.Tensor
    ff_norm: torch.Tensor
    ff_in: torch.Tensor
    ff_gate: torch.Tensor | None
    ff_out: torch.Tensor

    @classmethod
    def of(cls, block: torch.nn.Module) -> _Block:
        self_attention, cross_attention, ff = block.layer
        sa, ca = self_attention.SelfAttention, cross_attention.EncDecAttention
        weights = cls()
        weights.self_norm = self_attention.layer_norm.weight
        weights.self_qkv = torch.cat([sa.q.weight, sa.k.weight, sa.v.weight])
        weights.self_out = sa.o.weight
        weights.cross_norm = cross_attention.layer_norm.weight
        weights.cross_q = ca.q.weight
        weights.cross_kv = torch.cat([ca.k.weight, ca.v.weight])
        weights.cross_out = ca.o.weight
        weights.ff_norm = ff.layer_norm.weight
        weights.ff_in, weights.ff_gate, weights.ff_out = feed_forward_weights(ff)
        return weights
