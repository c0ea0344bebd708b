"""`softserve` command line. `serve` flags are the settings fields (`--max-batch-size` = `max_batch_size`)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from server.settings import Settings


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

    run_server(settings_from(args))


def keys(args: argparse.Namespace) -> None:
    from server.auth import ApiKeys

    api_keys = ApiKeys(settings_from(args).keys_file)
    if args.keys_command == "add":
        print(api_keys.add(args.tenant, admin=args.admin))
    elif args.keys_command == "list":
        print(json.dumps(api_keys.list(), indent=2))
    elif args.keys_command == "revoke":
        removed = api_keys.revoke(args.hash_prefix)
        print(f"revoked {removed} key(s)")
        if not removed:
            sys.exit(1)


def prompts(args: argparse.Namespace) -> None:
    from server.client import SoftserveClient, SoftserveError

    with SoftserveClient(args.url, args.api_key) as client:
        try:
            result = _prompts_call(client, args)
        except SoftserveError as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(1)
    if result is not None:
        print(json.dumps(result, indent=2))


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="softserve", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve_parser = commands.add_parser("serve", help="run the HTTP server")
    add_settings_flags(serve_parser)
    serve_parser.set_defaults(func=serve)

    keys_parser = commands.add_parser("keys", help="manage API keys (only hashes are stored)")
    add_settings_flags(keys_parser)
    keys_commands = keys_parser.add_subparsers(dest="keys_command", required=True)
    add = keys_commands.add_parser("add", help="make a key for TENANT and print it once")
    add.add_argument("tenant")
    add.add_argument("--admin", action="store_true")
    keys_commands.add_parser("list", help="list tenants and key hash prefixes")
    revoke = keys_commands.add_parser("revoke", help="revoke keys by hash prefix")
    revoke.add_argument("hash_prefix")
    keys_parser.set_defaults(func=keys)

    add_prompts_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
