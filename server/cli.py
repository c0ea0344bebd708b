"""`softserve` command line. `serve` flags are the settings fields (`--max-batch-size` = `max_batch_size`)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
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
    import uvicorn

    from server.app import create_app

    settings = settings_from(args)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info")


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
    return parser


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
