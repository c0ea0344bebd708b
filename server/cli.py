"""`softserve` command line. `serve` flags are the settings fields (`--max-batch-size` = `max_batch_size`)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from server.settings import Settings

if TYPE_CHECKING:
    from server.auth import ApiKeys


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    for name, field in Settings.model_fields.items():
        parser.add_argument(
            "--" + name.replace("_", "-"), dest=name, default=None, metavar=name.upper(), help=field.description
        )


def settings_from(args: argparse.Namespace) -> Settings:
    """Flags given on the command line win over `SOFTSERVE_*` variables, which win over defaults."""
    overrides: dict[str, Any] = {
        name: getattr(args, name) for name in Settings.model_fields if getattr(args, name, None) is not None
    }
    return Settings(**overrides)


def serve(args: argparse.Namespace) -> None:
    from server.app import serve as run_server
    from server.auth import KeysFileError

    try:
        run_server(settings_from(args))
    except KeysFileError as error:  # fail closed, with one line an operator can act on
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


def keys(args: argparse.Namespace) -> None:
    from server.auth import ApiKeys, KeysFileError

    api_keys = ApiKeys(settings_from(args).keys_file)
    try:
        _keys_command(api_keys, args)
    except (KeysFileError, ValueError) as error:  # a corrupt file, an unknown or ambiguous id, a bad name
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


def _keys_command(api_keys: ApiKeys, args: argparse.Namespace) -> None:
    if args.keys_command == "add":
        print(api_keys.add(args.tenant, admin=args.admin))
    elif args.keys_command == "list":
        listed = api_keys.list()
        print(json.dumps(listed, indent=2))
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
    from server.jobs.worker import run_worker

    run_worker(settings_from(args))


def run_client_command(args: argparse.Namespace, call: Callable[[Any, argparse.Namespace], Any]) -> Any:
    """Runs `call(client, args)` against `--url`; prints its result as JSON (errors: exit 1)."""
    from server.client import SoftserveClient, SoftserveError

    with SoftserveClient(args.url, args.api_key) as client:
        try:
            result = call(client, args)
        except SoftserveError as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(1)
    if result is not None:
        print(json.dumps(result, indent=2))
    return result


def prompts(args: argparse.Namespace) -> None:
    run_client_command(args, _prompts_call)


def _prompts_call(client: Any, args: argparse.Namespace) -> Any:
    command = args.prompts_command
    if command == "list":
        return client.list_prompts()
    if command == "show":
        return client.get_prompt(args.task_id)
    if command == "upload":
        metadata = json.loads(args.metadata) if args.metadata else {}
        if args.labels:
            metadata["labels"] = args.labels.split(",")
        if args.no_activate:
            metadata["activate"] = False
        return client.upload_prompt(args.task_id, Path(args.file), metadata or None)
    if command == "download":
        data = client.download_prompt(args.task_id, args.version, args.format)
        Path(args.output).write_bytes(data)
        return {"written": args.output, "bytes": len(data)}
    if command == "activate":
        return client.activate(args.task_id, args.version)
    client.delete_prompt(args.task_id)
    return {"deleted": args.task_id}


FINAL_STATES = ("succeeded", "failed", "cancelled")


def describe_progress(progress: dict[str, Any]) -> str:
    parts = [f"loss {progress['loss']:.4f}"] if progress.get("loss") is not None else []
    accuracy = (progress.get("eval") or {}).get("accuracy")
    if accuracy is not None:
        parts.append(f"eval accuracy {accuracy:.3f}")
    return ", ".join(parts)


def follow_job(client: Any, job_id: str, poll_s: float) -> dict[str, Any]:
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


def _train_call(client: Any, args: argparse.Namespace) -> dict[str, Any]:
    try:
        config = json.loads(args.config) if args.config else None
    except ValueError:
        print("error: --config is not valid JSON", file=sys.stderr)
        sys.exit(2)
    missing = [path for path in (args.train, args.eval) if path and not Path(path).is_file()]
    if missing:
        print(f"error: no such file: {missing[0]}", file=sys.stderr)
        sys.exit(2)
    accepted = client.submit_training_job(
        args.task_id, Path(args.train), Path(args.eval) if args.eval else None, config, not args.no_activate
    )
    if args.no_follow:
        return accepted
    try:
        return follow_job(client, accepted["job_id"], args.poll)
    except KeyboardInterrupt:
        job_id = accepted["job_id"]
        print(f"\njob {job_id} keeps running; `softserve jobs cancel {job_id}` cancels it", file=sys.stderr)
        sys.exit(130)


def train(args: argparse.Namespace) -> None:
    job = run_client_command(args, _train_call)
    if job.get("state") in ("failed", "cancelled"):
        sys.exit(1)


def _jobs_call(client: Any, args: argparse.Namespace) -> Any:
    if args.jobs_command == "list":
        return client.list_jobs()
    if args.jobs_command == "show":
        return client.get_job(args.job_id)
    return client.cancel_job(args.job_id)


def jobs(args: argparse.Namespace) -> None:
    run_client_command(args, _jobs_call)


def add_client_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=os.environ.get("SOFTSERVE_URL", "http://127.0.0.1:8000"))
    parser.add_argument("--api-key", default=os.environ.get("SOFTSERVE_API_KEY"))


def add_prompts_parser(commands: Any) -> None:
    parser = commands.add_parser("prompts", help="manage the prompt registry of a running server")
    add_client_flags(parser)
    sub = parser.add_subparsers(dest="prompts_command", required=True)
    sub.add_parser("list", help="list tasks")
    show = sub.add_parser("show", help="a task's metadata and versions")
    show.add_argument("task_id")
    upload = sub.add_parser("upload", help="upload a prompt file as a new version")
    upload.add_argument("task_id")
    upload.add_argument("file", help="safetensors, .npy, or a PEFT adapter zip/tar")
    upload.add_argument("--labels", help="comma-separated labels for /v1/classify")
    upload.add_argument("--metadata", help="JSON metadata (description, input_template, parameters, ...)")
    upload.add_argument("--no-activate", action="store_true", help="keep the current active version")
    download = sub.add_parser("download", help="download a version")
    download.add_argument("task_id")
    download.add_argument("version", type=int)
    download.add_argument("--format", default="safetensors", choices=["safetensors", "npy", "peft"])
    download.add_argument("-o", "--output", required=True)
    activate = sub.add_parser("activate", help="make a version the served one (rollback / roll forward)")
    activate.add_argument("task_id")
    activate.add_argument("version", type=int)
    delete = sub.add_parser("delete", help="delete a task and all its versions")
    delete.add_argument("task_id")
    parser.set_defaults(func=prompts)


def add_training_parsers(commands: Any) -> None:
    train_parser = commands.add_parser("train", help="train a prompt for TASK_ID on a running server and follow it")
    add_client_flags(train_parser)
    train_parser.add_argument("task_id")
    train_parser.add_argument("--train", required=True, help='JSONL: one {"input": ..., "target": ...} per line')
    train_parser.add_argument("--eval", help="JSONL eval set (early stopping keeps the best prompt on it)")
    train_parser.add_argument("--config", help='JSON training config, e.g. \'{"steps": 500, "prompt_length": 20}\'')
    train_parser.add_argument("--no-activate", action="store_true", help="register the prompt without serving it")
    train_parser.add_argument("--no-follow", action="store_true", help="print the job id and return")
    train_parser.add_argument("--poll", type=float, default=1.0, help="seconds between progress reads")
    train_parser.set_defaults(func=train)

    jobs_parser = commands.add_parser("jobs", help="training jobs of a running server")
    add_client_flags(jobs_parser)
    sub = jobs_parser.add_subparsers(dest="jobs_command", required=True)
    sub.add_parser("list", help="this tenant's jobs, newest first")
    for name, text in (("show", "a job's state, progress and history"), ("cancel", "cancel a queued or running job")):
        sub.add_parser(name, help=text).add_argument("job_id")
    jobs_parser.set_defaults(func=jobs)


BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"


def bench(args: argparse.Namespace) -> None:
    """Runs a script of the checkout's `bench/` folder (they are not installed with the package)."""
    import subprocess

    script = BENCH_DIR / f"{args.name}.py"
    if not script.is_file():
        available = sorted(p.stem for p in BENCH_DIR.glob("*.py") if p.stem != "common") if BENCH_DIR.is_dir() else []
        print(f"error: no benchmark {args.name!r} in {BENCH_DIR}; available: {', '.join(available) or 'none'}")
        sys.exit(2)
    sys.exit(subprocess.call([sys.executable, str(script), *args.bench_args]))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="softserve", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve_parser = commands.add_parser("serve", help="run the HTTP server")
    add_settings_flags(serve_parser)
    serve_parser.set_defaults(func=serve)

    worker_parser = commands.add_parser(
        "worker", help="run training jobs from the Redis queue (`--store redis`; one per GPU)"
    )
    add_settings_flags(worker_parser)
    worker_parser.set_defaults(func=worker)

    keys_parser = commands.add_parser("keys", help="manage API keys (only hashes are stored)")
    add_settings_flags(keys_parser)
    keys_commands = keys_parser.add_subparsers(dest="keys_command", required=True)
    add = keys_commands.add_parser("add", help="make a key for TENANT and print it once")
    add.add_argument("tenant")
    add.add_argument("--admin", action="store_true")
    keys_commands.add_parser("list", help="list keys: id, tenant, admin, created_at")
    revoke = keys_commands.add_parser("revoke", help="revoke one key by its exact id (see `keys list`)")
    revoke.add_argument("key_id")
    keys_commands.add_parser(
        "open", help="serve callers without a key as tenant `default` again (only once no keys are left)"
    )
    keys_parser.set_defaults(func=keys)

    bench_parser = commands.add_parser(
        "bench", help="run a benchmark of bench/ (e.g. `softserve bench overload --quick`)"
    )
    bench_parser.add_argument("name", help="mixed_vs_single, server_vs_raw, mixed_vs_per_task, overload, ...")
    bench_parser.add_argument("bench_args", nargs=argparse.REMAINDER, help="passed to the script")
    bench_parser.set_defaults(func=bench)

    add_prompts_parser(commands)
    add_training_parsers(commands)
    return parser


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
