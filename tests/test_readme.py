"""The README's configuration table is generated from the settings object and must stay current."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

from server.settings import env_example, settings_table
from tests.serving import server_process

README = Path(__file__).resolve().parents[1] / "README.md"


def test_configuration_table_matches_the_settings() -> None:
    text = README.read_text()
    match = re.search(r"<!-- settings-table:start -->\n(.*?)\n<!-- settings-table:end -->", text, re.S)
    assert match, "README lacks the settings-table markers"
    assert match.group(1) == settings_table(), "README is stale: run `python -m server.settings`"


def test_env_example_lists_every_setting() -> None:
    assert (README.parent / ".env.example").read_text() == env_example(), "run `python -m server.settings`"


def tour_blocks() -> list[str]:
    tour = README.read_text().split("## API tour (curl)", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)```", tour, re.S)


def test_the_api_tour_runs_as_written(tmp_path: Path) -> None:
    """A new user's path: the README's examples, in order, against a fresh `softserve serve`."""
    blocks = tour_blocks()
    assert len(blocks) == 2
    with server_process(tmp_path / "data", "--engine", "thread") as (_, url):
        port = url.rsplit(":", 1)[1]
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "SOFTSERVE_URL": url}
        for block in blocks:
            script = "set -euo pipefail\n" + block.replace("127.0.0.1:8000", f"127.0.0.1:{port}")
            run = subprocess.run(
                ["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
            )
            assert run.returncode == 0, run.stderr
            assert not re.search(r'"error":\s*\{', run.stdout), (
                run.stdout
            )  # no error body (a job's "error": null is fine)
    assert zipfile.is_zipfile(tmp_path / "sst2.zip")
    assert '"state":"cancelled"' in run.stdout.replace(" ", "")
