"""Strict JSON for anything a client sends: `NaN`, `Infinity` and `-Infinity` are not JSON.

Python's `json` accepts those literals; a value parsed from them is stored as `null` by a later
`json.dumps`/pydantic round trip and no longer validates. Refusing them at parse time keeps every
stored number finite. (A number that overflows, such as `1e999`, is valid JSON syntax: it parses to
infinity and the models' `allow_inf_nan=False` refuses it as an out-of-range field, a 422.)
"""

from __future__ import annotations

import json
from typing import Any


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON (numbers must be finite)")


def loads(data: str | bytes | bytearray) -> Any:
    """`json.loads` that raises `ValueError` on the non-standard `NaN`/`Infinity` literals."""
    return json.loads(data, parse_constant=_refuse_constant)


# Each of these outside a string begins a value (a container) or separates two: their count bounds the values.
STRUCTURAL = ("[", "{", ",")


def values_over_by_counts(body: bytes, limit: int) -> bool | None:
    """Whether a JSON text holds more than `limit` values (each `[`, `{` and `,` outside strings, and each string,
    counting one), when byte counts tell it at C speed; None when only `walked_values_over` can (the strings hold
    such characters, or the text is not UTF-8)."""
    if json.detect_encoding(body) not in ("utf-8", "utf-8-sig"):
        return None
    quotes = body.count(b'"')
    # Every string has an opening and a closing quote; the only other quotes are escaped (`\"`, a count that
    # also takes in an escaped backslash ending a string): the number of strings lies within these bounds.
    if (quotes - body.count(b'\\"')) // 2 > limit:
        return True
    if quotes // 2 + sum(body.count(char.encode()) for char in STRUCTURAL) <= limit:
        return False
    if not quotes:  # no strings: every one counted is outside them
        return True
    return None


def walked_values_over(body: bytes, limit: int) -> bool:
    """`values_over_by_counts`, exactly: counts only outside strings, skipping each string with `json`'s C string
    scanner. It walks at most `limit` strings, long enough that callers run it on a worker thread. A text that is
    not JSON answers False: its parser fails fast."""
    try:
        text = body.decode(json.detect_encoding(body))
    except (UnicodeDecodeError, LookupError):
        return False
    values, strings, position = 0, 0, 0
    while True:
        quote = text.find('"', position)
        end = len(text) if quote == -1 else quote
        values += sum(text.count(char, position, end) for char in STRUCTURAL)
        if values + strings > limit:
            return True
        if quote == -1:
            return False
        strings += 1
        try:
            position = json.decoder.scanstring(text, quote + 1, False)[1]  # type: ignore[attr-defined]
        except ValueError:  # an unterminated string or a bad escape: the parser stops there
            return False
