"""Structured output: which tokens a row may take next, from a grammar (a JSON schema, a regex, or a choice among
strings), through llguidance.

llguidance (a Rust library with no Python dependencies) compiles a grammar once and answers, at each step, the
set of tokens that keep the text inside the grammar, for any tokenizer given as the bytes of each token id. Of
the maintained engines it is the one that fits a CPU server and the T5 tokenizers: xgrammar needs triton (about
1 GB, for GPU kernels) and apache-tvm-ffi besides torch, and outlines-core builds an index over the vocabulary per
regex. The byte-level ByT5 tokenizer (`tiny`) is given token by token (one byte each); SentencePiece T5 tokenizers
through llguidance's own reader of `transformers`' fast tokenizers.

`Grammars` keeps, per grammar text, one compiled matcher as a template (bounded LRU); a row gets a copy, which
keeps its own state as it consumes its tokens. A matcher that has finished its grammar allows only
end-of-sequence, so the row ends there.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any, Literal

import llguidance
import llguidance.hf
import torch
from transformers import PreTrainedTokenizerBase

GrammarKind = Literal["json_schema", "regex", "choice"]
JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False}  # compact JSON: a row cannot pad forever
BITS = torch.arange(32, dtype=torch.int32)


class InvalidGrammar(ValueError):
    """The grammar does not compile (the message says why)."""


def grammar_text(kind: GrammarKind, value: Any) -> str:
    """The llguidance grammar of a JSON schema (a dict), a regex (a string) or a choice (a list of strings)."""
    if kind == "json_schema":
        return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(value), defaults=JSON_OPTIONS)
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(value)
    return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(choice) for choice in value))


class _ByteTokens:
    """A byte-level tokenizer as llguidance reads one: the bytes of each token id (special ids have none)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, eos_token_id: int) -> None:
        self.eos_token_id = eos_token_id
        self.bos_token_id = None
        special = set(tokenizer.all_special_ids) | set(range(len(tokenizer), vocab_size))
        self.special_token_ids = sorted(i for i in special if i < vocab_size)
        self.tokens = [b"" if i in special else _token_bytes(tokenizer, i) for i in range(vocab_size)]
        self._tokenizer = tokenizer

    def __call__(self, text: bytes | str) -> list[int]:
        text = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text
        return self._tokenizer(text, add_special_tokens=False)["input_ids"]


def _token_bytes(tokenizer: PreTrainedTokenizerBase, token_id: int) -> bytes:
    piece = tokenizer.convert_ids_to_tokens(token_id)
    return bytes([ord(piece)]) if len(piece) == 1 and ord(piece) < 256 else piece.encode()


def grammar_tokenizer(tokenizer: PreTrainedTokenizerBase, vocab_size: int, eos_token_id: int) -> llguidance.LLTokenizer:
    if tokenizer.is_fast:
        return llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos_token_id)
    wrapper = llguidance.TokenizerWrapper(_ByteTokens(tokenizer, vocab_size, eos_token_id))
    return llguidance.LLTokenizer(wrapper, n_vocab=vocab_size)


class Grammars:
    """Compiled grammars of one model's tokenizer, a template matcher per grammar text (thread-safe)."""

    def __init__(self, tokenizer: llguidance.LLTokenizer, max_cached: int = 256) -> None:
        self.tokenizer = tokenizer
        self.max_cached = max_cached
        self._templates: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()

    def compiled(self, grammar: str) -> bool:
        with self._lock:
            return grammar in self._templates

    def compile(self, grammar: str) -> None:
        """Compiles `grammar` (slow for a large one: call it off any loop); raises `InvalidGrammar`."""
        if self.compiled(grammar):
            return
        template = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        if template.is_error():
            raise InvalidGrammar(template.get_error())
        with self._lock:
            self._templates[grammar] = template
            while len(self._templates) > self.max_cached:
                self._templates.popitem(last=False)

    def matcher(self, grammar: str) -> llguidance.LLMatcher:
        """A fresh matcher for one row (compiles first if it must)."""
        self.compile(grammar)
        with self._lock:
            self._templates.move_to_end(grammar)
            return self._templates[grammar].deep_copy()


def allowed_tokens(matchers: list[llguidance.LLMatcher], vocab_size: int) -> torch.Tensor:
    """`[len(matchers), vocab_size]` booleans: the tokens each matcher allows next."""
    words = (vocab_size + 31) // 32
    bitmask = torch.zeros(len(matchers), words, dtype=torch.int32)
    for i, matcher in enumerate(matchers):
        row = bitmask[i]
        matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())
    bits = (bitmask.unsqueeze(-1) >> BITS) & 1
    return bits.view(len(matchers), words * 32)[:, :vocab_size].bool()
