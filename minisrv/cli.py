"""The `minisrv` command: one subcommand per module, each adding its own flags."""
from __future__ import annotations

import argparse
import sys

from minisrv import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minisrv",
        description="A small, fast LLM inference server with an OpenAI-compatible API.",
    )
    parser.add_argument("--version", action="version", version=f"minisrv {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # Subcommands register themselves here as their modules land (serve, chat).
    for register in _subcommands():
        register(sub)
    return parser


def _subcommands() -> list:
    registrars = []
    try:
        from minisrv.server.cli import register_serve, register_chat

        registrars += [register_serve, register_chat]
    except ImportError:
        pass
    return registrars


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
