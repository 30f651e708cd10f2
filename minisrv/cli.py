"""The `minisrv` command: `serve` and `run-batch` (their flags generated from the configs' fields) and `chat`.

Every flag of `minisrv serve` comes from a field of EngineConfig or ServerConfig (minisrv/config.py):
its name in dashes, the aliases vLLM and SGLang users know, its help, range and choices. Values are
checked while parsing; a bad one ends the command with one line naming the flag.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import types
import typing
from typing import Any, NoReturn

from minisrv import __version__
from minisrv.config import API_KEY_ENV, DEFAULT_MODEL, EngineConfig, ServerConfig, flag_name
from minisrv.fields import Range, check_value

FLAG_GROUPS = {"model": "model", "engine": "engine (scheduler, KV cache, device)",
               "parallel": "parallelism (GPUs, hosts)", "server": "server (HTTP, workers)"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minisrv",
        description="A small, fast LLM inference server with an OpenAI-compatible API.",
    )
    parser.add_argument("--version", action="version", version=f"minisrv {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    register_serve(sub)
    register_run_batch(sub)
    register_chat(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return int(args.run(args) or 0)


# --- flags from config fields ---------------------------------------------------------------------------

def _value_type(kind: type, name: str, meta: dict[str, Any]):
    """An argparse type: parses `kind` and checks the field's range, naming neither (argparse names the flag)."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        problem = check_value(name, value, meta)
        if problem is not None:
            raise argparse.ArgumentTypeError(problem.removeprefix(f"{name} "))
        return value

    parse.__name__ = kind.__name__  # argparse names the type in some messages
    return parse


def _string_list(text: str) -> tuple[str, ...]:
    """A list flag: a JSON list of strings (vLLM's form) or comma-separated values."""
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise argparse.ArgumentTypeError(f"not a JSON list: {exc}") from None
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise argparse.ArgumentTypeError("must be a JSON list of strings")
        return tuple(items)
    return tuple(item.strip() for item in text.split(",") if item.strip())


_string_list.__name__ = "list"


class _JoinedLists(argparse.Action):
    """A list flag's values, several of them each a list (`--served-model-name a b`, `a,b` or '["a", "b"]'): one
    tuple."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, tuple(item for value in values for item in value))


def _base_type(hint: Any) -> type:
    """The type inside an Optional (`int | None` -> int); other hints as they are."""
    if typing.get_origin(hint) not in (typing.Union, types.UnionType):
        return hint
    return next(a for a in typing.get_args(hint) if a is not type(None))


def add_config_flags(groups: dict[str, argparse._ArgumentGroup], config_type: type) -> None:
    """One flag per field of `config_type` that declares a help text (nested configs are skipped)."""
    hints = typing.get_type_hints(config_type)
    for f in dataclasses.fields(config_type):
        meta = f.metadata
        if "help" not in meta:
            continue
        group, kind = groups[meta["group"]], _base_type(hints[f.name])
        names = [flag_name(f.name), *meta["flags"]]
        default = None if meta["secret"] else f.default
        if kind is bool:
            group.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default,
                               help=meta["help"])
            for negative in meta["negative_flags"]:
                group.add_argument(negative, dest=f.name, action="store_false",
                                   help=f"the same as --no-{flag_name(f.name)[2:]}")
        elif kind in (int, float):
            group.add_argument(*names, dest=f.name, type=_value_type(kind, f.name, meta), default=default,
                               help=meta["help"], metavar=kind.__name__.upper())
        elif typing.get_origin(kind) is tuple:
            group.add_argument(*names, dest=f.name, type=_string_list, nargs="+", action=_JoinedLists,
                               default=default, help=meta["help"], metavar="LIST")
        else:
            choices = meta["choices"]
            group.add_argument(*names, dest=f.name, default=default, choices=choices, help=meta["help"],
                               type=str.lower if choices else None)


def config_from_flags(config_type: type, args: argparse.Namespace, **nested: Any) -> Any:
    """The config built from parsed flags (a field's `env` variable stands in for a flag not given)."""
    values = dict(nested)
    for f in dataclasses.fields(config_type):
        if "help" in f.metadata:
            value = getattr(args, f.name)
            env = f.metadata["env"]
            values[f.name] = value if value is not None or env is None else os.environ.get(env) or None
    return config_type(**values)


def server_config(args: argparse.Namespace) -> ServerConfig:
    return config_from_flags(ServerConfig, args, engine=config_from_flags(EngineConfig, args))


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where it says something (not None/False, not already in the help text)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or "default" in (action.help or "") or action.nargs == 0:
            return action.help or ""
        return super()._get_help_string(action)


def _one_line_error(parser: argparse.ArgumentParser, message: str) -> NoReturn:
    # argparse prints the whole usage (dozens of lines for serve) before the error; one line is easier to read.
    parser.exit(2, f"{parser.prog}: error: {message} (see --help)\n")


def _subcommand(subparsers: argparse._SubParsersAction, name: str, help: str, description: str
                ) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(name, help=help, description=description, formatter_class=_HelpFormatter)
    parser.error = functools.partial(_one_line_error, parser)
    return parser


# --- serve ----------------------------------------------------------------------------------------------

def register_serve(subparsers: argparse._SubParsersAction) -> None:
    p = _subcommand(subparsers, "serve", "start the OpenAI-compatible server",
                    "Serve a model over the OpenAI HTTP API (chat completions, completions and responses, SSE "
                    "streaming), plus /generate, /health and /metrics.")
    add_server_flags(p)
    p.set_defaults(run=run_serve)


def add_server_flags(p: argparse.ArgumentParser) -> None:
    """The model (positional or --model) and every setting's flag."""
    p.add_argument("model_tag", nargs="?", metavar="MODEL",
                   help="the model to serve, as --model gives it (`minisrv serve org/name`, as `vllm serve`)")
    groups = {key: p.add_argument_group(title) for key, title in FLAG_GROUPS.items()}
    add_config_flags(groups, EngineConfig)
    add_config_flags(groups, ServerConfig)


def server_config_of(args: argparse.Namespace) -> ServerConfig | None:
    """The settings `add_server_flags` parsed, or None after printing why they do not go together."""
    try:
        if args.model_tag is not None:
            if args.model not in (args.model_tag, DEFAULT_MODEL):
                raise ValueError(f"the model is given twice: {args.model_tag!r} and --model {args.model!r}")
            args.model = args.model_tag
        return server_config(args)
    except ValueError as exc:   # settings that contradict each other (each alone passed argparse)
        print(f"minisrv {args.command}: error: {exc}", file=sys.stderr)
        return None


def run_serve(args: argparse.Namespace) -> int:
    from minisrv.runtime.launch import serve  # imports the engine stack; keep `minisrv --help` light

    config = server_config_of(args)
    return 2 if config is None else serve(config)


# --- run-batch ------------------------------------------------------------------------------------------

def register_run_batch(subparsers: argparse._SubParsersAction) -> None:
    p = _subcommand(subparsers, "run-batch", "answer a file of requests in OpenAI's batch format, offline",
                    "Run every request of a JSONL file in OpenAI's batch format (one {custom_id, method, url, body} "
                    "a line; /v1/chat/completions, /v1/completions, /v1/responses) through the server's engine and "
                    "routes, without HTTP, and write one {id, custom_id, response, error} line per request, in the "
                    "input's order, as `vllm run-batch` does. The flags are `minisrv serve`'s (those of HTTP "
                    "itself do nothing here).")
    p.add_argument("-i", "--input-file", required=True, help="the requests, one JSON object a line ('-': stdin)")
    p.add_argument("-o", "--output-file", required=True, help="where the answers go ('-': stdout)")
    add_server_flags(p)
    p.set_defaults(run=run_batch_command)


def run_batch_command(args: argparse.Namespace) -> int:
    from minisrv.runtime.batch import run_batch

    config = server_config_of(args)
    return 2 if config is None else run_batch(config, args.input_file, args.output_file)


# --- chat -----------------------------------------------------------------------------------------------

def register_chat(subparsers: argparse._SubParsersAction) -> None:
    p = _subcommand(subparsers, "chat", "chat with a running server in the terminal",
                    "An interactive chat against a running minisrv (or any OpenAI-compatible) server. "
                    "Replies stream as they are generated; /reset clears the history, /exit quits.")
    positive = {"range": Range(1)}
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL")
    p.add_argument("--model", default=None, help="model name to send (default: the server's only model)")
    p.add_argument("--api-key", default=None, help=f"API key (also ${API_KEY_ENV})")
    p.add_argument("--system", default=None, help="a system prompt to start every conversation with")
    p.add_argument("--max-tokens", type=_value_type(int, "max_tokens", positive), default=None,
                   help="most tokens per reply")
    p.add_argument("--temperature", type=_value_type(float, "temperature", {"range": Range(0.0)}), default=None,
                   help="sampling temperature")
    p.set_defaults(run=run_chat_command)


def run_chat_command(args: argparse.Namespace) -> int:
    from minisrv.chat import ChatSession, run_chat

    session = ChatSession(args.url, model=args.model, api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
                          system=args.system, max_tokens=args.max_tokens, temperature=args.temperature)
    return run_chat(session, input, sys.stdout)


if __name__ == "__main__":
    sys.exit(main())
