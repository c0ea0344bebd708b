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
