"""`softserve` command line.

`serve`, `engine`, `worker` and `keys` flags are the settings fields (`--max-batch-size` = `max_batch_size`); flags
win over `SOFTSERVE_*` variables, which win over a `.env` file in the working directory. `prompts`, `train` and
`jobs` talk to a running server: `--url` / `--api-key` (before or after the subcommand), else `SOFTSERVE_URL` /
`SOFTSERVE_API_KEY` (environment or `.env`). Every failure a user can cause ends in one `error: ...` line on
stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import faulthandler
import io
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from pydantic import ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from server.settings import Settings

if TYPE_CHECKING:
    from server.client import SoftserveClient
    from server.tenancy.keys import ApiKeys

DOTENV = ".env"
EXIT_USAGE = 2
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a writer whose reader went away
EXIT_INTERRUPTED = 130  # 128 + SIGINT


class CommandError(Exception):
    """A failure the user can act on: `main` prints it as one `error: ...` line and exits with `exit_code`."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


KEYS_SETTINGS = ("data_dir", "api_keys_file")  # all that `keys` reads: its --help lists no others


def add_settings_flags(
    parser: argparse.ArgumentParser, names: Iterable[str] = tuple(Settings.model_fields), default: Any = None
) -> None:
    """`default=argparse.SUPPRESS` on a subcommand: a flag it was not given keeps what its parent command got."""
    for name in names:
        field = Settings.model_fields[name]
        parser.add_argument(
            "--" + name.replace("_", "-"), dest=name, default=default, metavar=name.upper(), help=field.description
        )


def describe_setting_error(error: Any) -> str:
    """One pydantic error as the flag and variable a user typed: `--port (SOFTSERVE_PORT) 'x': Input should..`."""
    if not error["loc"]:  # a check across fields
        return str(error["msg"])
    name = str(error["loc"][0])
    return f"--{name.replace('_', '-')} (SOFTSERVE_{name.upper()}) {error['input']!r}: {error['msg']}"


def settings_from(args: argparse.Namespace) -> Settings:
    """Flags given on the command line win over `SOFTSERVE_*` variables, then `.env`, then defaults."""
    overrides: dict[str, Any] = {
        name: getattr(args, name) for name in Settings.model_fields if getattr(args, name, None) is not None
    }
    try:
        return Settings(_env_file=DOTENV, **overrides)
    except ValidationError as error:
        problems = "; ".join(describe_setting_error(problem) for problem in error.errors())
        raise CommandError(f"invalid setting: {problems}", EXIT_USAGE) from None


def serve(args: argparse.Namespace) -> None:
    settings = settings_from(args)
    check_can_listen(settings.host, settings.port)  # before the heavy imports and the model

    from server.app import StartupFailed
    from server.app import serve as run_server
    from server.tenancy.keys import KeysFileError

    try:
        run_server(settings)
    except KeysFileError as error:  # fail closed, with one line an operator can act on
        raise CommandError(str(error), EXIT_USAGE) from None
    except StartupFailed as error:
        raise CommandError(str(error)) from None


def check_can_listen(host: str, port: int) -> None:
    """Binds the address as uvicorn will, and lets it go: a port in use or a host that is not this machine's is
    one line now, not uvicorn's traceback once the model has loaded."""
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
            sock.bind(address)
    except OSError as error:  # `socket.gaierror` (an unknown host) included
        raise CommandError(f"cannot listen on {host}:{port}: {error.strerror or error}", EXIT_USAGE) from None


def keys(args: argparse.Namespace) -> None:
    from server.tenancy.keys import ApiKeys, KeysFileError

    keys_file = settings_from(args).keys_file
    print(f"keys file: {keys_file}", file=sys.stderr)  # which one, when a --data-dir was forgotten
    api_keys = ApiKeys(keys_file)
    try:
        _keys_command(api_keys, args)
    except (KeysFileError, ValueError) as error:  # a corrupt file, an unknown or ambiguous id, a bad name
        raise CommandError(str(error)) from None


def readable_time(epoch_s: float) -> str:
    """`2026-12-03T21:40:05+00:00`: UTC, to the second."""
    from datetime import UTC, datetime

    return datetime.fromtimestamp(epoch_s, UTC).isoformat(timespec="seconds")


def _keys_command(api_keys: ApiKeys, args: argparse.Namespace) -> None:
    if args.keys_command == "add":
        print(api_keys.add(args.tenant, admin=args.admin))
    elif args.keys_command == "list":
        listed = api_keys.list()
        print(json.dumps([entry | {"created_at": readable_time(entry["created_at"])} for entry in listed], indent=2))
        print(f"auth mode in the keys file: {api_keys.file_mode} ({len(listed)} key(s))", file=sys.stderr)
    elif args.keys_command == "revoke":
        revoked = api_keys.revoke(args.key_id)
        print(f"revoked key {revoked.id} of tenant {revoked.tenant}")
        if not api_keys.list():
            print("no keys are left: every request is refused until `softserve keys add` (or `keys open`)")
    elif args.keys_command == "open":
        api_keys.open()
        print("open mode: callers without a key are tenant `default` (never admin)")


def worker(args: argparse.Namespace) -> None:
    from server.serving.load_errors import ModelLoadError
    from server.worker import RedisUnreachable, run_worker

    try:
        run_worker(settings_from(args))
    except (ModelLoadError, RedisUnreachable) as error:
        raise CommandError(str(error)) from None


def engine(args: argparse.Namespace) -> None:
    import zmq

    from server.engine.curve import EngineKeysError, wire_keys

    settings = settings_from(args)
    try:
        wire_keys(args.address, settings.engine_keys_dir, settings.engine_insecure_tcp)  # before the heavy imports
    except EngineKeysError as error:
        raise CommandError(str(error), EXIT_USAGE) from None

    from server.engine.process import run_engine_process
    from server.serving.load_errors import ModelLoadError

    try:
        run_engine_process(settings, args.address)
    except ModelLoadError as error:
        raise CommandError(str(error)) from None
    except EngineKeysError as error:
        raise CommandError(str(error), EXIT_USAGE) from None
    except zmq.ZMQError as error:
        raise CommandError(f"cannot bind {args.address}: {error}", EXIT_USAGE) from None


def engine_keys(args: argparse.Namespace) -> None:
    from server.engine.curve import EngineKeysError, make_keys

    try:
        made = make_keys(args.directory)
    except (EngineKeysError, OSError) as error:
        raise CommandError(str(error)) from None
    for path in made:
        print(path)
    directory = args.directory
    print(
        f"the engine: --engine-keys-dir {directory} (reads engine.key_secret and authorized_clients/); "
        f"API processes: --engine-keys-dir {directory} (read client.key_secret and engine.key). "
        "Keep the *.key_secret files private.",
        file=sys.stderr,
    )


class ClientTarget(BaseSettings):
    """Where the client commands send requests when `--url` / `--api-key` are not given."""

    model_config = SettingsConfigDict(env_prefix="SOFTSERVE_", extra="ignore")

    url: str = "http://127.0.0.1:8000"
    api_key: str | None = None


def client_target(args: argparse.Namespace) -> ClientTarget:
    given = {name: getattr(args, name) for name in ("url", "api_key") if getattr(args, name, None) is not None}
    target = ClientTarget(_env_file=DOTENV, **given)
    check_server_url(target.url)
    return target


def check_server_url(url: str) -> None:
    """The two ways a URL that looks right fails: no scheme (httpx refuses it), or the API's `/v1` included (every
    path would then start `/v1/v1/`, a 404 that names no cause)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise CommandError(
            f"--url/SOFTSERVE_URL {url!r} is not an http(s) URL: http://{url.split('://')[-1]}?", EXIT_USAGE
        )
    if parts.path.rstrip("/").endswith("/v1"):
        root = url.rstrip("/").removesuffix("/v1")
        raise CommandError(
            f"--url/SOFTSERVE_URL {url!r}: give the server's root, {root} (commands add /v1)", EXIT_USAGE
        )


def run_client_command(args: argparse.Namespace, call: Callable[[SoftserveClient, argparse.Namespace], Any]) -> Any:
    """Runs `call(client, args)` against the server; prints its result (JSON, or a bare string such as a job id)."""
    import httpx

    from server.client import SoftserveClient, SoftserveError

    target = client_target(args)
    with SoftserveClient(target.url, target.api_key) as client:
        try:
            result = call(client, args)
        except SoftserveError as error:
            raise CommandError(str(error)) from None
        except httpx.TransportError as error:
            reason = str(error) or type(error).__name__
            raise CommandError(
                f"no answer from {target.url} ({reason}): is `softserve serve` running there? "
                "Point --url or SOFTSERVE_URL at it"
            ) from None
        except OSError as error:
            if error.filename is None:  # not a file the user named (a closed pipe, a socket): not ours to explain
                raise
            raise CommandError(f"cannot open {error.filename}: {error.strerror}") from None
    if result is not None:
        print(result if isinstance(result, str) else json.dumps(result, indent=2))
    return result


def json_flag(flag: str, text: str | None) -> Any:
    try:
        return json.loads(text) if text else None
    except ValueError as error:
        raise CommandError(f"{flag} is not valid JSON ({error})", EXIT_USAGE) from None


def upload_metadata(args: argparse.Namespace) -> dict[str, Any] | None:
    metadata = json_flag("--metadata", args.metadata) or {}
    if not isinstance(metadata, dict):
        raise CommandError("--metadata must be a JSON object", EXIT_USAGE)
    if args.labels:
        metadata["labels"] = [label.strip() for label in args.labels.split(",")]  # "a, b" means "a" and "b"
    if args.no_activate:
        metadata["activate"] = False
    return metadata or None


def prompts(args: argparse.Namespace) -> None:
    run_client_command(args, _prompts_call)


def _prompts_call(client: SoftserveClient, args: argparse.Namespace) -> Any:
    command = args.prompts_command
    if command == "list":
        return client.list_prompts()
    if command == "show":
        return client.get_prompt(args.task_id)
    if command == "upload":
        return client.upload_prompt(args.task_id, Path(args.file), upload_metadata(args))
    if command == "download":
        data = client.download_prompt(args.task_id, args.version, args.format)
        Path(args.output).write_bytes(data)
        return {"written": args.output, "bytes": len(data)}
    if command == "activate":
        return client.activate(args.task_id, args.version)
    if command == "ensemble":
        return ensemble_call(client, args)
    if command == "explain":
        return client.nearest_tokens(args.task_id, args.version, args.k)
    if command == "similar":
        return client.similar_tasks(args.task_id, args.k)
    if command == "pin":
        return client.pin(args.task_id)
    if command == "unpin":
        return client.unpin(args.task_id)
    client.delete_prompt(args.task_id)
    return {"deleted": args.task_id}


def ensemble_call(client: SoftserveClient, args: argparse.Namespace) -> dict[str, Any]:
    """Sets the task's ensemble to the versions given, clears it (`--clear`), or shows it (neither)."""
    if args.clear and args.versions:
        raise CommandError("give versions to set the ensemble, or --clear to clear it, not both", EXIT_USAGE)
    if args.clear:
        task = client.clear_ensemble(args.task_id)
    elif args.versions:
        task = client.set_ensemble(args.task_id, args.versions)
    else:
        task = client.get_prompt(args.task_id)
    return {"task_id": task["task_id"], "ensemble": task["ensemble"]}


FINAL_STATES = ("succeeded", "failed", "cancelled")


def describe_progress(progress: dict[str, Any]) -> str:
    parts = [f"loss {progress['loss']:.4f}"] if progress.get("loss") is not None else []
    accuracy = (progress.get("eval") or {}).get("accuracy")
    if accuracy is not None:
        parts.append(f"eval accuracy {accuracy:.3f}")
    return ", ".join(parts)


def follow_job(client: SoftserveClient, job_id: str, poll_s: float) -> dict[str, Any]:
    """Polls the job until it ends, drawing a progress bar (step/total, loss, eval) on stderr."""
    from tqdm import tqdm

    with tqdm(total=None, unit="step", file=sys.stderr, dynamic_ncols=True, desc=job_id[:8]) as bar:
        while True:
            job = client.get_job(job_id)
            progress = job["progress"]
            bar.total, bar.n = progress["total_steps"], progress["step"]
            bar.set_postfix_str(f"{job['state']}, {describe_progress(progress)}".rstrip(", "), refresh=False)
            bar.refresh()
            if job["state"] in FINAL_STATES:
                return job
            time.sleep(poll_s)


def _train_call(client: SoftserveClient, args: argparse.Namespace) -> dict[str, Any] | str:
    config = json_flag("--config", args.config)
    accepted = client.submit_training_job(
        args.task_id, Path(args.train), Path(args.eval) if args.eval else None, config, not args.no_activate
    )
    job_id: str = accepted["job_id"]
    if args.no_follow:
        return job_id  # printed bare, so that `job=$(softserve train ... --no-follow)` works
    try:
        return follow_job(client, job_id, args.poll)
    except KeyboardInterrupt:
        print(f"\njob {job_id} keeps running; `softserve jobs cancel {job_id}` cancels it", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)


def train(args: argparse.Namespace) -> None:
    job = run_client_command(args, _train_call)
    if isinstance(job, dict) and job.get("state") in ("failed", "cancelled"):
        reason = f": {job['error']}" if job.get("error") else ""
        raise CommandError(f"job {job['job_id']} {job['state']}{reason}")


def _jobs_call(client: SoftserveClient, args: argparse.Namespace) -> Any:
    if args.jobs_command == "list":
        return client.list_jobs()
    if args.jobs_command == "show":
        return client.get_job(args.job_id)
    return client.cancel_job(args.job_id)


def jobs(args: argparse.Namespace) -> None:
    run_client_command(args, _jobs_call)


def client_flags() -> argparse.ArgumentParser:
    """`--url` / `--api-key` for every client command and subcommand. SUPPRESS keeps a subcommand that was not
    given them from overwriting what its parent command was given (`prompts --url X list`)."""
    flags = argparse.ArgumentParser(add_help=False)
    flags.add_argument(
        "--url", default=argparse.SUPPRESS, help="the server (default: SOFTSERVE_URL, else http://127.0.0.1:8000)"
    )
    flags.add_argument("--api-key", default=argparse.SUPPRESS, help="an API key (default: SOFTSERVE_API_KEY)")
    return flags


def add_prompts_parser(commands: Any, flags: argparse.ArgumentParser) -> None:
    parser = commands.add_parser("prompts", parents=[flags], help="manage the prompt registry of a running server")
    sub = parser.add_subparsers(dest="prompts_command", required=True)
    sub.add_parser("list", parents=[flags], help="list every task (all pages)")
    show = sub.add_parser("show", parents=[flags], help="a task's metadata and versions")
    show.add_argument("task_id")
    upload = sub.add_parser("upload", parents=[flags], help="upload a prompt file as a new version")
    upload.add_argument("task_id")
    upload.add_argument("file", help="safetensors, .npy, or a PEFT adapter zip/tar")
    upload.add_argument("--labels", help="comma-separated labels for /v1/classify")
    upload.add_argument("--metadata", help="JSON metadata (description, input_template, parameters, ...)")
    upload.add_argument("--no-activate", action="store_true", help="keep the current active version")
    download = sub.add_parser("download", parents=[flags], help="download a version")
    download.add_argument("task_id")
    download.add_argument("version", type=int)
    download.add_argument("--format", default="safetensors", choices=["safetensors", "npy", "peft"])
    download.add_argument("-o", "--output", required=True)
    activate = sub.add_parser(
        "activate", parents=[flags], help="make a version the served one (rollback / roll forward)"
    )
    activate.add_argument("task_id")
    activate.add_argument("version", type=int)
    explain = sub.add_parser(
        "explain", parents=[flags], help="each prompt position's nearest vocabulary tokens, and the labels among them"
    )
    explain.add_argument("task_id")
    explain.add_argument("version", type=int)
    explain.add_argument("-k", type=int, default=5, help="tokens per position (1..100)")
    similar = sub.add_parser(
        "similar", parents=[flags], help="your tasks whose active prompts are most like this task's"
    )
    similar.add_argument("task_id")
    similar.add_argument("-k", type=int, default=5, help="how many tasks (1..100)")
    ensemble = sub.add_parser(
        "ensemble", parents=[flags], help="set (VERSIONS), clear (--clear) or show the task's ensemble"
    )
    ensemble.add_argument("task_id")
    ensemble.add_argument("versions", type=int, nargs="*", help="the versions `ensemble` requests serve together")
    ensemble.add_argument("--clear", action="store_true", help="clear the ensemble")
    pin = sub.add_parser("pin", parents=[flags], help="keep the task's prompt on every replica's device")
    pin.add_argument("task_id")
    unpin = sub.add_parser("unpin", parents=[flags], help="let the task's prompt be evicted again")
    unpin.add_argument("task_id")
    delete = sub.add_parser("delete", parents=[flags], help="delete a task and all its versions")
    delete.add_argument("task_id")
    parser.set_defaults(func=prompts)


def add_training_parsers(commands: Any, flags: argparse.ArgumentParser) -> None:
    train_parser = commands.add_parser(
        "train", parents=[flags], help="train a prompt for TASK_ID on a running server and follow it"
    )
    train_parser.add_argument("task_id")
    train_parser.add_argument("--train", required=True, help='JSONL: one {"input": ..., "target": ...} per line')
    train_parser.add_argument("--eval", help="JSONL eval set (early stopping keeps the best prompt on it)")
    train_parser.add_argument("--config", help='JSON training config, e.g. \'{"steps": 500, "prompt_length": 20}\'')
    train_parser.add_argument("--no-activate", action="store_true", help="register the prompt without serving it")
    train_parser.add_argument("--no-follow", action="store_true", help="print the job id and return")
    train_parser.add_argument("--poll", type=float, default=1.0, help="seconds between progress reads")
    train_parser.set_defaults(func=train)

    jobs_parser = commands.add_parser("jobs", parents=[flags], help="training jobs of a running server")
    sub = jobs_parser.add_subparsers(dest="jobs_command", required=True)
    sub.add_parser("list", parents=[flags], help="this tenant's jobs, newest first")
    for name, text in (("show", "a job's state, progress and history"), ("cancel", "cancel a queued or running job")):
        sub.add_parser(name, parents=[flags], help=text).add_argument("job_id")
    jobs_parser.set_defaults(func=jobs)


BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"


# Runs a bench script as `python script.py` would, but a Ctrl-C ends it without a traceback (its `finally`
# blocks, which stop the servers it started, still run as the interrupt unwinds).
# The script runs in a process group of its own, so a Ctrl-C reaches `softserve bench` only, which asks the script
# to stop with SIGTERM: the script turns it into KeyboardInterrupt and stops its servers. A SIGTERM that comes before
# the handler is set (the interpreter still starting, nothing started yet) ends it at once, with no traceback.
# An interrupt raised while a finalizer (`__del__`) runs is dropped by Python with an "Exception ignored" traceback:
# the unraisable hook raises it again 10 ms later (an alarm), outside the finalizer. One raised while a module is
# being imported can leave a C extension half initialised (numpy's next import fails with "cannot load module more
# than once per process", torch's can abort the process): it waits, 10 ms at a time, until no import is under way.
RUN_QUIETLY_ON_CTRL_C = """
import os, runpy, signal, sys
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # blocked by `softserve bench` while it started this
def importing(frame):
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False
stopping = []
def interrupted(signum, frame):
    stopping.append(signum)
    if importing(frame):
        signal.setitimer(signal.ITIMER_REAL, 0.01)
        return
    raise KeyboardInterrupt
def dropped(unraisable):
    if isinstance(unraisable.exc_value, KeyboardInterrupt):  # again in 10 ms, by an alarm: after this hook
        signal.setitimer(signal.ITIMER_REAL, 0.01)
    else:
        sys.__unraisablehook__(unraisable)
signal.signal(signal.SIGALRM, interrupted)
signal.signal(signal.SIGTERM, interrupted)
sys.unraisablehook = dropped
sys.argv = sys.argv[1:]
sys.path[0] = os.path.dirname(sys.argv[0])
try:
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    finally:  # the script is over: nothing is interrupted from here on
        signal.signal(signal.SIGALRM, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.setitimer(signal.ITIMER_REAL, 0)
except KeyboardInterrupt:
    sys.exit(130)
if stopping:  # asked to stop as its last import ran: it ended on its own, but not as asked
    sys.exit(130)
"""


def bench(args: argparse.Namespace) -> None:
    """Runs a script of the checkout's `bench/` folder (they are not installed with the package)."""
    import subprocess

    script = BENCH_DIR / f"{args.name}.py"
    if not script.is_file():
        available = sorted(p.stem for p in BENCH_DIR.glob("*.py") if p.stem != "common") if BENCH_DIR.is_dir() else []
        raise CommandError(
            f"no benchmark {args.name!r} in {BENCH_DIR}; available: {', '.join(available) or 'none'}", EXIT_USAGE
        )
    command = [sys.executable, "-c", RUN_QUIETLY_ON_CTRL_C, str(script), *args.bench_args]
    # A Ctrl-C that comes while the script is being started (forked, not yet running) waits until it can be stopped.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    script_run = subprocess.Popen(command, process_group=0)
    try:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        sys.exit(script_run.wait())
    except KeyboardInterrupt:
        script_run.terminate()
        while True:
            try:
                script_run.wait()
                break
            except KeyboardInterrupt:  # a second Ctrl-C while it stops its servers: they stop all the same
                continue
        raise CommandError(f"bench {args.name} interrupted", EXIT_INTERRUPTED) from None


def add_server_parsers(commands: Any) -> None:
    serve_parser = commands.add_parser("serve", help="run the HTTP server")
    add_settings_flags(serve_parser)
    serve_parser.set_defaults(func=serve)

    worker_parser = commands.add_parser(
        "worker", help="run training jobs from the Redis queue (`--store redis`; one per GPU)"
    )
    add_settings_flags(worker_parser)
    worker_parser.set_defaults(func=worker)

    engine_parser = commands.add_parser(
        "engine", help="run the engine alone, for API processes started with `--engine-address` to share"
    )
    engine_parser.add_argument(
        "--address", required=True, help="ZeroMQ address to bind, e.g. tcp://0.0.0.0:5555 or ipc:///run/engine.sock"
    )
    add_settings_flags(engine_parser)
    engine_parser.set_defaults(func=engine)

    engine_keys_parser = commands.add_parser(
        "engine-keys", help="make the CURVE keys that secure a tcp:// engine and its API processes (--engine-keys-dir)"
    )
    engine_keys_parser.add_argument(
        "directory", type=Path, help="made if missing (private, 0700); keys already there are never replaced"
    )
    engine_keys_parser.set_defaults(func=engine_keys)

    keys_parser = commands.add_parser("keys", help="manage API keys (only hashes are stored)")
    add_settings_flags(keys_parser, KEYS_SETTINGS)
    keys_commands = keys_parser.add_subparsers(dest="keys_command", required=True)
    add = keys_commands.add_parser("add", help="make a key for TENANT and print it once")
    add.add_argument("tenant")
    add.add_argument("--admin", action="store_true")
    listing = keys_commands.add_parser("list", help="list keys: id, tenant, admin, created_at (UTC)")
    revoke = keys_commands.add_parser("revoke", help="revoke one key by its exact id (see `keys list`)")
    revoke.add_argument("key_id")
    reopen = keys_commands.add_parser(
        "open", help="serve callers without a key as tenant `default` again (only once no keys are left)"
    )
    for subcommand in (add, listing, revoke, reopen):  # `keys list --data-dir X` as well as `keys --data-dir X list`
        add_settings_flags(subcommand, KEYS_SETTINGS, default=argparse.SUPPRESS)
    keys_parser.set_defaults(func=keys)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="softserve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    add_server_parsers(commands)

    bench_parser = commands.add_parser(
        "bench", help="run a benchmark of bench/ (e.g. `softserve bench overload --quick`)"
    )
    bench_parser.add_argument("name", help="mixed_vs_single, server_vs_raw, mixed_vs_per_task, overload, ...")
    bench_parser.add_argument("bench_args", nargs=argparse.REMAINDER, help="passed to the script")
    bench_parser.set_defaults(func=bench)

    flags = client_flags()
    add_prompts_parser(commands, flags)
    add_training_parsers(commands, flags)
    return parser


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # httpx logs every request at INFO: noise in a client command, and it tears `softserve train`'s progress bar.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # torch logs its compile caches' statistics at INFO as the interpreter exits: noise after a Ctrl-C.
    logging.getLogger("torch").setLevel(logging.WARNING)


def leave_quietly_on_closed_stdout() -> NoReturn:
    """`softserve ... | head`: the reader left. Python would flush stdout again at exit and print a second
    error, so stdout is pointed at /dev/null first; the exit status says what happened, as a shell's does."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(EXIT_BROKEN_PIPE)


def dump_stacks_on_sigusr1() -> None:
    """`kill -USR1 PID` prints every thread's stack to stderr: a stuck server, engine or worker can be looked
    into without stopping it (the tests do so before they give up on a process). Not where stderr is no file
    (`main` called in-process with its output captured, or no stderr at all)."""
    with suppress(io.UnsupportedOperation, AttributeError, ValueError, RuntimeError):
        faulthandler.register(signal.SIGUSR1, all_threads=True)


def main(argv: list[str] | None = None) -> None:
    configure_logging()
    dump_stacks_on_sigusr1()
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
        sys.stdout.flush()  # a closed pipe shows up here, where it can be handled, not at interpreter exit
    except CommandError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
    except BrokenPipeError:
        leave_quietly_on_closed_stdout()
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    main()
