"""A newcomer's path: every mistake ends in one clear line and a non-zero exit, and what the README shows runs.

Each CLI test runs the real `softserve` (`python -m server.cli`) as a process, against a real server over HTTP.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from server.cli import RUN_QUIETLY_ON_CTRL_C, build_parser, settings_from
from server.errors import Unauthorized
from server.serving.tiny import tiny_config
from server.settings import Settings
from server.tenancy.keys import ApiKeys
from server.testing.checkpoints import save_checkpoint
from tests.redis_server import RedisServer
from tests.serving import free_port, wait_ready
from tests.training import config, examples, jsonl, one_torch_thread  # noqa: F401 (an autouse fixture)

ROOT = Path(__file__).resolve().parents[1]
SOFTSERVE = [sys.executable, "-m", "server.cli"]


def softserve(*args: str, cwd: Path | None = None, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    """Runs the CLI as a user would: its own process, the test's environment plus `env`."""
    return subprocess.run(
        [*SOFTSERVE, *args], cwd=cwd, env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout
    )


def assert_one_error_line(run: subprocess.CompletedProcess, *fragments: str, exit_code: int = 1) -> str:
    """The run failed with `exit_code`, without a traceback, and its last stderr line is the one error line."""
    assert run.returncode == exit_code, (run.returncode, run.stderr[-3000:])
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), run.stderr[-3000:]
    assert run.stderr.count("error: ") == 1, run.stderr[-3000:]
    for fragment in fragments:
        assert fragment in last, last
    return last


# --- start-up failures: the process ends, with one line that names the cause --------------------------------


def unavailable_cuda_device() -> str:
    """`cuda` where there is no CUDA (the common mistake); past the last GPU where there is one."""
    return f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"


# The hub as unreachable as on a machine without network, on any machine: nothing listens at its address, and
# HF_HUB_OFFLINE (which would skip the network on its own) is off.
UNREACHABLE_HUB = {"HF_ENDPOINT": f"http://127.0.0.1:{free_port()}", "HF_HUB_OFFLINE": "0"}


@pytest.mark.parametrize(
    ("flags", "why"),
    [
        (("--model", "{tmp}/no-such-checkpoint"), "no such directory, and it is not a hub id"),
        (("--model", "softserve-tests/no-such-model"), "the hub could not be reached"),
        (("--device", unavailable_cuda_device()), "cannot use device"),
    ],
    ids=["missing-directory", "hub-id-unreachable", "cuda-unavailable"],
)
def test_serve_exits_with_one_line_when_the_model_cannot_load(tmp_path: Path, flags: tuple[str, str], why: str) -> None:
    flags = (flags[0], flags[1].format(tmp=tmp_path))
    run = softserve(
        "serve",
        *flags,
        "--port",
        str(free_port()),
        "--data-dir",
        str(tmp_path / "data"),
        HF_HOME=str(tmp_path / "hf"),  # an empty cache: the id cannot be found in one
        **UNREACHABLE_HUB,
    )
    assert_one_error_line(run, why, flags[1])
    assert "Retry" not in run.stderr  # huggingface_hub's retries are a minute of backoff without network


def test_a_cached_hub_id_loads_from_the_cache_when_the_hub_is_unreachable(tmp_path: Path) -> None:
    revision = "0" * 40
    repo = tmp_path / "hf" / "hub" / "models--softserve-tests--cached"
    save_checkpoint(tiny_config(), repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    load = "from server.serving.model import FrozenT5; print(FrozenT5.load('softserve-tests/cached', 'cpu').d_model)"
    run = subprocess.run(
        [sys.executable, "-c", load],
        env={**os.environ, "HF_HOME": str(tmp_path / "hf"), **UNREACHABLE_HUB},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == str(tiny_config().d_model)
    assert "Retry" not in run.stderr, run.stderr[-3000:]


def test_worker_reads_dotenv_and_exits_with_one_line_when_the_model_cannot_load(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """Without the `.env` (store=redis, a Redis that answers) the worker would refuse to start for another reason."""
    (tmp_path / ".env").write_text(
        f"SOFTSERVE_STORE=redis\nSOFTSERVE_REDIS_URL={redis_server.url}\nSOFTSERVE_MODEL={tmp_path}/missing\n"
        f"SOFTSERVE_DATA_DIR={tmp_path}/data\n"
    )
    run = softserve("worker", cwd=tmp_path)
    assert_one_error_line(run, f"cannot load model '{tmp_path}/missing': no such directory")


# --- one line for each user mistake ----------------------------------------------------------------------------


def test_a_bad_setting_is_one_line_naming_the_flag_and_variable(tmp_path: Path) -> None:
    flag = softserve("serve", "--port", "notaport", cwd=tmp_path)
    assert_one_error_line(flag, "--port", "SOFTSERVE_PORT", "'notaport'", exit_code=2)
    assert len(flag.stderr.strip().splitlines()) == 1
    variable = softserve("serve", cwd=tmp_path, SOFTSERVE_MAX_BATCH_SIZE="0")
    assert_one_error_line(variable, "--max-batch-size", "SOFTSERVE_MAX_BATCH_SIZE", exit_code=2)


def test_no_server_at_the_url_is_one_line(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    assert_one_error_line(softserve("prompts", "list", "--url", url, cwd=tmp_path), url, "softserve serve")
    assert_one_error_line(softserve("jobs", "list", cwd=tmp_path, SOFTSERVE_URL=url), url)


def test_a_missing_file_is_one_line(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # the file is read before anything is sent
    upload = softserve("prompts", "upload", "t", "missing.npy", "--url", url, cwd=tmp_path)
    assert_one_error_line(upload, "cannot open missing.npy: No such file or directory")
    train = softserve("train", "t", "--train", "missing.jsonl", "--url", url, cwd=tmp_path)
    assert_one_error_line(train, "cannot open missing.jsonl")
    bad_json = softserve("prompts", "upload", "t", "missing.npy", "--metadata", "{", "--url", url, cwd=tmp_path)
    assert_one_error_line(bad_json, "--metadata is not valid JSON", exit_code=2)


def test_a_reader_that_leaves_early_ends_the_cli_quietly(tmp_path: Path) -> None:
    """`softserve ... | head`: the output's reader is gone before the CLI writes (here: before it starts)."""
    ApiKeys(tmp_path / "api_keys.json").add("acme")
    listing = subprocess.Popen(
        [*SOFTSERVE, "keys", "--data-dir", str(tmp_path), "list"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    listing.stdout.close()  # type: ignore[union-attr]
    stderr = listing.stderr.read()  # type: ignore[union-attr]
    assert listing.wait(timeout=60) == 141, stderr
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr


# --- the client commands: --url / --api-key anywhere, a quiet log, what --no-follow promises -----------------


def test_url_and_api_key_are_taken_before_or_after_the_subcommand(base_url: str, settings: Settings) -> None:
    key = ApiKeys(settings.keys_file).add("acme")  # auth turns on without a restart
    refused = softserve("prompts", "list", "--url", base_url)
    assert_one_error_line(refused, "401")
    for args, env in [
        (("prompts", "list", "--url", base_url, "--api-key", key), {}),
        (("prompts", "--url", base_url, "--api-key", key, "list"), {}),
        (("prompts", "--url", base_url, "list", "--api-key", key), {}),
        (("jobs", "list", "--api-key", key), {"SOFTSERVE_URL": base_url}),
        (("jobs", "--url", base_url, "list"), {"SOFTSERVE_API_KEY": key}),
    ]:
        run = softserve(*args, **env)
        assert run.returncode == 0, (args, run.stderr)
        assert json.loads(run.stdout) == []
        assert "HTTP Request" not in run.stderr  # httpx's INFO line per request is kept quiet


def test_client_defaults_come_from_dotenv(base_url: str, tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(f"SOFTSERVE_URL={base_url}\nSOFTSERVE_PORT=1\nCOMPOSE_PROJECT_NAME=x\n")
    run = softserve("prompts", "list", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == []


def test_train_no_follow_prints_the_job_id_and_follow_draws_a_clean_bar(base_url: str, tmp_path: Path) -> None:
    (tmp_path / "train.jsonl").write_bytes(jsonl(examples()))
    common = ("--train", "train.jsonl", "--url", base_url, "--config", json.dumps(config(steps=3)))
    submitted = softserve("train", "quick", *common, "--no-follow", cwd=tmp_path)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    assert httpx.get(f"{base_url}/v1/training-jobs/{job_id}").json()["job_id"] == job_id

    followed = softserve("train", "followed", *common, "--poll", "0.05", cwd=tmp_path)
    assert followed.returncode == 0, followed.stderr
    assert json.loads(followed.stdout)["state"] == "succeeded"
    assert "HTTP Request" not in followed.stderr and "3/3" in followed.stderr  # the bar reached its end


# --- the README's Python example, `.env`, and the Makefile's torch index --------------------------------------


def readme_python_block() -> str:
    section = (ROOT / "README.md").read_text().split("## Python client", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1
    return blocks[0]


def test_the_readme_python_example_runs_as_written(base_url: str, tmp_path: Path) -> None:
    """With the tour's `prompt.npy` in the working directory, as the README says."""
    np.save(tmp_path / "prompt.npy", np.random.default_rng(0).normal(size=(20, 64)).astype("float32"))
    script = readme_python_block().replace("http://127.0.0.1:8000", base_url)
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert lines[1] in ("positive", "negative") and lines[2] == "404 not_found", lines
    assert len(ast.literal_eval(lines[3])) == 2  # the two concurrent async requests


def test_dotenv_is_read_below_the_environment_and_the_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / ".env").write_text(
        "SOFTSERVE_PORT=1111\nSOFTSERVE_MAX_BATCH_SIZE=7\nSOFTSERVE_MAX_WAIT_MS=3\n"
        "SOFTSERVE_URL=http://elsewhere\nCOMPOSE_PROJECT_NAME=x\n"  # not settings: ignored, not refused
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SOFTSERVE_MAX_BATCH_SIZE", "9")
    settings = settings_from(build_parser().parse_args(["serve", "--port", "2222"]))
    assert (settings.port, settings.max_batch_size, settings.max_wait_ms) == (2222, 9, 3.0)
    assert Settings().max_wait_ms == Settings.model_fields["max_wait_ms"].default  # only the CLI reads `.env`


def test_env_example_copied_to_dotenv_gives_the_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copy(ROOT / ".env.example", tmp_path / ".env")
    monkeypatch.chdir(tmp_path)
    for name in Settings.model_fields:
        monkeypatch.delenv(f"SOFTSERVE_{name.upper()}", raising=False)
    assert settings_from(build_parser().parse_args(["serve"])) == Settings()


def test_serve_reads_dotenv(tmp_path: Path) -> None:
    port = free_port()
    (tmp_path / ".env").write_text(f"SOFTSERVE_PORT={port}\nSOFTSERVE_WARMUP=false\nCOMPOSE_PROJECT_NAME=x\n")
    env = {key: value for key, value in os.environ.items() if key != "SOFTSERVE_PORT"}
    log = tmp_path / "serve.log"
    with log.open("w") as stderr:
        server = subprocess.Popen([*SOFTSERVE, "serve"], cwd=tmp_path, env=env, stderr=stderr)
    try:
        wait_ready(f"http://127.0.0.1:{port}", 120)  # the port is only in `.env`
        assert (tmp_path / "data").is_dir()  # the default data dir, relative to the working directory
        assert f"ready at http://127.0.0.1:{port}: model tiny" in log.read_text()  # said once /ready is 200
    finally:
        server.kill()
        server.wait(timeout=30)


def make_dry_run(*variables: str) -> str:
    run = subprocess.run(["make", "-n", "-C", str(ROOT), "install", *variables], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    (torch_line,) = [line for line in run.stdout.splitlines() if '"torch==' in line]
    return torch_line


def test_make_install_takes_torch_from_torch_index_url() -> None:
    cpu_index = "https://download.pytorch.org/whl/cpu"
    assert make_dry_run(f"TORCH_INDEX_URL={cpu_index}").endswith(f"--index-url {cpu_index}")
    assert "--index-url" not in make_dry_run()  # empty: pip's own configuration decides


# --- serving where it cannot listen: one line before the model loads --------------------------------------------


@contextmanager
def port_in_use() -> Iterator[int]:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


def test_serve_where_it_cannot_listen_is_one_line_before_the_model_loads(tmp_path: Path) -> None:
    with port_in_use() as port:
        in_use = softserve("serve", "--port", str(port), cwd=tmp_path)
    runs = {
        "Address already in use": in_use,
        "--port (SOFTSERVE_PORT) '99999'": softserve("serve", "--port", "99999", cwd=tmp_path),
        "cannot listen on 10.255.255.1": softserve("serve", "--host", "10.255.255.1", cwd=tmp_path),
        "cannot listen on nosuchhost.invalid": softserve("serve", "--host", "nosuchhost.invalid", cwd=tmp_path),
    }
    for says, run in runs.items():
        assert_one_error_line(run, says, exit_code=2)
        assert len(run.stderr.strip().splitlines()) == 1  # no server started, no model loaded: nothing logged


# --- `softserve keys` ---------------------------------------------------------------------------------------------


def test_keys_take_the_data_dir_after_the_subcommand_and_say_which_file_they_read(tmp_path: Path) -> None:
    data_dir = tmp_path / "elsewhere"
    made = softserve("keys", "add", "acme", "--data-dir", str(data_dir), cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    assert f"keys file: {data_dir / 'api_keys.json'}" in made.stderr
    for args in (("list", "--data-dir", str(data_dir)), ("--data-dir", str(data_dir), "list")):
        listed = softserve("keys", *args, cwd=tmp_path)
        assert listed.returncode == 0, listed.stderr
        (entry,) = json.loads(listed.stdout)
        assert entry["tenant"] == "acme"
        created = datetime.fromisoformat(entry["created_at"])  # a date a person reads, not an epoch
        assert created.tzinfo is not None and abs(datetime.now(UTC) - created) < timedelta(minutes=10)
    assert json.loads(softserve("keys", "list", cwd=tmp_path).stdout) == []  # ./data: another file, no keys


def test_keys_help_lists_only_the_keys_settings() -> None:
    shown = softserve("keys", "--help")
    flags = set(re.findall(r"^  (--[a-z-]+)", shown.stdout, re.MULTILINE))
    assert flags == {"--data-dir", "--api-keys-file"}, shown.stdout  # and `-h, --help`


def test_a_key_sent_without_bearer_is_told_what_is_missing(tmp_path: Path) -> None:
    keys = ApiKeys(tmp_path / "api_keys.json")
    key = keys.add("acme")
    with pytest.raises(Unauthorized, match="lacks its `Bearer ` prefix"):
        keys.authenticate(key)
    with pytest.raises(Unauthorized, match="missing API key"):
        keys.authenticate(None)
    assert keys.authenticate(f"Bearer {key}").tenant == "acme"


def test_labels_given_with_spaces_after_the_commas_are_the_labels(base_url: str, tmp_path: Path) -> None:
    prompt = tmp_path / "p.npy"
    np.save(prompt, np.random.default_rng(0).normal(size=(4, 64)).astype(np.float32))
    uploaded = softserve("prompts", "upload", "t", str(prompt), "--labels", "good, bad", "--url", base_url)
    assert uploaded.returncode == 0, uploaded.stderr
    shown = json.loads(softserve("prompts", "show", "t", "--url", base_url).stdout)
    assert shown["labels"] == ["good", "bad"], shown


def test_a_worker_whose_redis_is_down_says_so_in_one_line(tmp_path: Path) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    run = softserve(
        "worker", "--store", "redis", "--redis-url", url, "--data-dir", str(tmp_path / "data"), cwd=tmp_path
    )
    assert_one_error_line(run, "cannot reach Redis", "Connection refused", "--redis-url")
    assert len(run.stderr.strip().splitlines()) == 1  # before the model loads: nothing else was logged


@pytest.mark.parametrize(
    ("url", "hint"),
    [
        ("127.0.0.1:8000", "not an http(s) URL: http://127.0.0.1:8000?"),
        ("http://127.0.0.1:8000/v1", "give the server's root, http://127.0.0.1:8000 (commands add /v1)"),
    ],
    ids=["no-scheme", "with-v1"],
)
def test_a_server_url_that_looks_right_gets_a_hint(tmp_path: Path, url: str, hint: str) -> None:
    assert_one_error_line(softserve("prompts", "list", "--url", url, cwd=tmp_path), hint, exit_code=2)
    assert_one_error_line(softserve("jobs", "list", cwd=tmp_path, SOFTSERVE_URL=url), hint, exit_code=2)


def child_pids(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def take_ctrl_c() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


# A group of its own, as a terminal's foreground job, which takes Ctrl-C even when this run inherited SIGINT ignored
# (a suite started as a script's background job does: a shell without job control ignores it for `cmd &`).
AS_A_TERMINAL_JOB: dict[str, Any] = {"start_new_session": True, "preexec_fn": take_ctrl_c}


@pytest.mark.parametrize("moment", ["as_it_is_forked", "as_the_script_starts", "once_it_runs_its_servers"])
def test_ctrl_c_in_bench_ends_it_with_one_line_and_leaves_no_process(tmp_path: Path, moment: str) -> None:
    """Ctrl-C reaches the terminal's whole process group: the CLI, which stops the bench script it runs (in a group
    of its own), whether the script is only forked (the CLI still inside `Popen`: polled with no pause), its
    interpreter is still starting, or it already runs servers (hot_load's redis-server)."""
    cli = subprocess.Popen(
        [*SOFTSERVE, "bench", "hot_load", "--quick"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        **AS_A_TERMINAL_JOB,
    )
    deadline = time.monotonic() + 120
    while not (scripts := child_pids(cli.pid)) and time.monotonic() < deadline:
        time.sleep(0 if moment == "as_it_is_forked" else 0.01)
    assert scripts, "the bench script never started"
    servers: list[int] = []
    while moment == "once_it_runs_its_servers" and not servers and time.monotonic() < deadline:
        servers = child_pids(scripts[0])
        time.sleep(0.05)
    assert servers or moment != "once_it_runs_its_servers", "the bench script started no server"
    os.killpg(cli.pid, signal.SIGINT)
    _, stderr = cli.communicate(timeout=120)
    assert cli.returncode == 130, stderr
    assert "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == "error: bench hot_load interrupted", stderr
    for pid in [*scripts, *servers]:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text(), pid


def imports_torch(pid: int) -> bool:
    """Whether the process has begun to import torch (its library is mapped): the seconds of `serve`'s start-up
    before it listens. (A Ctrl-C in an interpreter's first milliseconds, before the site module is imported, is
    Python's own fatal error; no program can catch it.)"""
    return "libtorch_cpu" in Path(f"/proc/{pid}/maps").read_text()


@pytest.mark.parametrize("moment", ["as_it_imports", "as_its_engine_starts", "once_ready"])
def test_ctrl_c_in_serve_ends_it_quietly_and_leaves_no_engine(tmp_path: Path, moment: str) -> None:
    """Ctrl-C reaches the terminal's whole process group. The engine child runs in a session of its own, so the
    server alone takes it and stops its engine: exit 130, no traceback, the engine not reported down."""
    port = free_port()
    server = subprocess.Popen(
        [*SOFTSERVE, "serve", "--port", str(port), "--data-dir", str(tmp_path / "data")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        **AS_A_TERMINAL_JOB,
    )
    assert server.stderr is not None
    deadline = time.monotonic() + 120
    while not imports_torch(server.pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    said, engines = "", []
    wanted = {"as_it_imports": None, "as_its_engine_starts": "started engine process", "once_ready": "ready at http"}
    while wanted[moment] and wanted[moment] not in said and (line := server.stderr.readline()):
        said += line
        engines += [int(pid) for pid in re.findall(r"started engine process (\d+)", line)]
    assert wanted[moment] is None or engines, said
    os.killpg(server.pid, signal.SIGINT)
    _, stderr = server.communicate(timeout=120)
    said += stderr
    assert server.returncode == 130, said
    for noise in ("Traceback", "KeyboardInterrupt", "killed by signal", "is down", "error"):
        assert noise not in said, said
    for pid in engines:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text(), pid


SIGTERM_INSIDE_A_FINALIZER = """
import gc, os, signal, time
class Finalized:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)  # the interrupt is raised here, where Python drops it
try:
    Finalized()
    gc.collect()
    time.sleep(5)
    print("not interrupted")
finally:
    print("cleaned up")
"""


def test_an_interrupt_that_lands_in_a_finalizer_still_stops_a_bench_script(tmp_path: Path) -> None:
    """A SIGTERM raised as KeyboardInterrupt inside a `__del__` (a Redis pool's, in one run) was dropped by Python
    with an "Exception ignored" traceback, and the script ran on: the bench wrapper raises it again outside."""
    script = tmp_path / "finalizer.py"
    script.write_text(SIGTERM_INSIDE_A_FINALIZER)
    ran = subprocess.run(
        [sys.executable, "-c", RUN_QUIETLY_ON_CTRL_C, str(script)], capture_output=True, text=True, timeout=60
    )
    assert ran.returncode == 130, ran.stderr
    assert ran.stdout.split() == ["cleaned", "up"] and ran.stderr == ""


SIGTERM_INSIDE_AN_IMPORT = """
import sys
sys.path.insert(0, sys.argv[1])
try:
    import slow_module
    print("imported", slow_module.done)
    import time
    time.sleep(5)
    print("not interrupted")
finally:
    print("cleaned up")
"""
SLOW_MODULE = """
import os, signal, time
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(0.2)  # the interrupt would be raised here, half-way through the module (a C extension's init, in real runs)
done = True
"""


def test_an_interrupt_that_lands_in_an_import_waits_until_the_module_is_imported(tmp_path: Path) -> None:
    """A SIGTERM raised as KeyboardInterrupt inside an import left numpy half initialised ("cannot load module more
    than once per process", a traceback) or aborted the process in torch's: the wrapper raises it once the import
    is done."""
    script = tmp_path / "importer.py"
    script.write_text(SIGTERM_INSIDE_AN_IMPORT)
    (tmp_path / "slow_module.py").write_text(SLOW_MODULE)
    ran = subprocess.run(
        [sys.executable, "-c", RUN_QUIETLY_ON_CTRL_C, str(script), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ran.returncode == 130, ran.stderr
    assert ran.stdout.splitlines() == ["imported True", "cleaned up"] and ran.stderr == ""


def test_serve_says_which_engine_it_waits_for(tmp_path: Path) -> None:
    """`--engine-address` with no engine there: the log says where it waits (not `starting` with no word)."""
    address = f"ipc://{tmp_path}/nobody-here.sock"
    command = [sys.executable, "-m", "server.cli", "serve", "--port", str(free_port()), "--engine-address", address]
    env = {**os.environ, "SOFTSERVE_DATA_DIR": str(tmp_path / "data")}
    server = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        deadline = time.monotonic() + 120
        seen = []
        assert server.stderr is not None
        while time.monotonic() < deadline:
            line = server.stderr.readline()
            seen.append(line)
            if f"waiting for an engine at {address}" in line:
                break
            assert line, "".join(seen)  # the server exited without saying it
        else:
            raise AssertionError("".join(seen))
    finally:
        server.kill()
        server.wait(timeout=30)
