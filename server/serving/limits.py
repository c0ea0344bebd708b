"""`ServingLimits`: what one request (or a task's upload) may ask of the model, as plain values.

Built once from the settings by the composition root (`server.components`), so the services check plain
numbers and never read the settings themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

from server.errors import InvalidInput

# `max_input_chars` 0 means this many characters per allowed token: far above what any text that fits in
# `max_input_tokens` needs (a byte-level token is at most one character), so only absurd inputs are refused
# before tokenizing.
CHARS_PER_TOKEN = 64


@dataclass(frozen=True)
class ServingLimits:
    max_inputs_per_request: int
    max_input_tokens: int
    max_input_chars: int  # 0: `CHARS_PER_TOKEN` per allowed token
    max_new_tokens: int
    max_beam_tokens: int
    max_batch_tokens: int
    max_prompt_length: int
    max_template_chars: int
    request_timeout_s: float
    max_top_logprobs: int
    max_grammar_bytes: int

    @property
    def max_chars(self) -> int:
        """The longest input or label, in characters (after the task's template), checked before tokenizing."""
        return self.max_input_chars or CHARS_PER_TOKEN * self.max_input_tokens

    def check_decoding(self, max_new_tokens: int, num_beams: int, field_prefix: str = "") -> None:
        """Refuses decoding past the server's caps; `field_prefix` places the fields in the message (a task's
        default `parameters.` at upload)."""
        if max_new_tokens > self.max_new_tokens:
            raise InvalidInput(
                f"{field_prefix}max_new_tokens is {max_new_tokens}; this server's limit is {self.max_new_tokens}"
            )
        if num_beams * max_new_tokens > self.max_beam_tokens:
            raise InvalidInput(
                f"{field_prefix}num_beams * max_new_tokens is {num_beams} * {max_new_tokens}; this server's limit "
                f"is {self.max_beam_tokens}"
            )
