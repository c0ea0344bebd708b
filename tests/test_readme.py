"""The README's configuration table is generated from the settings object and must stay current."""

from __future__ import annotations

import re
from pathlib import Path

from server.settings import env_example, settings_table

README = Path(__file__).resolve().parents[1] / "README.md"


def test_configuration_table_matches_the_settings() -> None:
    text = README.read_text()
    match = re.search(r"<!-- settings-table:start -->\n(.*?)\n<!-- settings-table:end -->", text, re.S)
    assert match, "README lacks the settings-table markers"
    assert match.group(1) == settings_table(), "README is stale: run `python -m server.settings`"


def test_env_example_lists_every_setting() -> None:
    assert (README.parent / ".env.example").read_text() == env_example(), "run `python -m server.settings`"
