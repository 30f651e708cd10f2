"""`minisrv serve` and `minisrv chat`: their flags (named as vLLM/SGLang users expect) and their config.

Flag values are checked while parsing; a bad one ends the command with one line naming the flag.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
from typing import Callable, NoReturn

from minisrv.config import DEFAULT_MODEL, EngineConfig, ServerConfig

API_KEY_ENV = "MINISRV_API_KEY"
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def _number(kind: Callable[[str], int | float], low: float, high: float | None = None, low_open: bool = False):
    """An argparse type: a number of `kind` in [low, high] (or (low, high] when low_open)."""
    interval = f"{'(' if low_open else '['}{low:g}, {'inf)' if high is None else f'{high:g}]'}"

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        if value < low or (low_open and value == low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be in {interval}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in some messages
    return parse


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where it says something (not None/False, not already in the help text)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def _one_line_error(parser: argparse.ArgumentParser, message: str) -> NoReturn:
    # argparse prints the whole usage (dozens of lines for serve) before the error; one line is easier to read.
    parser.exit(2, f"{parser.prog}: error: {message} (see --help)\n")


def register_serve(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve", help="start the OpenAI-compatible server",
        description="Serve a model over the OpenAI HTTP API (chat and completions, SSE streaming), "
                    "plus /generate, /health and /metrics.",
        formatter_class=_HelpFormatter,
    )
    p.error = functools.partial(_one_line_error, p)
    d = EngineConfig()
    s = ServerConfig()
    model = p.add_argument_group("model")
    model.add_argument("--model", default=DEFAULT_MODEL,
                       help="'embedded' (SmolLM2-135M-Instruct, fetched on first use), a Hugging Face model "
                            "directory, a .gguf file, or a preset name with --load-format dummy")
    model.add_argument("--served-model-name", default=None,
                       help="the model name clients send and responses report (default: from --model)")
    model.add_argument("--load-format", choices=("auto", "dummy"), default=d.load_format,
                       help="'dummy': random weights for a preset config (benchmarks without weights)")
    model.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default=d.dtype,
                       help="weight and activation dtype; auto: bfloat16 on CUDA, float32 on CPU")
    model.add_argument("--chat-template", default=None,
                       help="a Jinja chat template, or a file holding one (default: the model's)")
    model.add_argument("--max-model-len", type=_number(int, 1), default=None,
                       help="context length: prompt plus output tokens (default: the model's)")
    model.add_argument("--seed", type=_number(int, 0, 2**63 - 1), default=d.seed,
                       help="seeds dummy weights and the seeds drawn for requests that give none")

    engine = p.add_argument_group("engine")
    engine.add_argument("--device", choices=("auto", "cpu", "cuda"), default=d.device,
                        help="auto: cuda when a GPU is visible, else cpu")
    engine.add_argument("--tp-size", "--tensor-parallel-size", dest="tp_size", type=_number(int, 1),
                        default=d.tp_size, help="tensor-parallel ranks (one scheduler process per GPU)")
    engine.add_argument("--max-running-requests", type=_number(int, 1), default=d.max_running_requests,
                        help="most requests in the running batch at once")
    engine.add_argument("--max-num-batched-tokens", type=_number(int, 1), default=d.max_num_batched_tokens,
                        help="per-step token budget (prefill chunks plus decode tokens)")
    engine.add_argument("--page-size", type=_number(int, 1, 1024), default=d.page_size,
                        help="tokens per KV cache page")
    engine.add_argument("--kv-cache-memory", type=_number(float, 0, low_open=True), default=None,
                        help="GiB for the KV cache (default: a fixed size on CPU, "
                             "--gpu-memory-utilization of free memory on CUDA)")
    engine.add_argument("--gpu-memory-utilization", type=_number(float, 0, 1, low_open=True),
                        default=d.gpu_memory_fraction, help="share of free GPU memory for the KV cache")
    engine.add_argument("--disable-prefix-cache", action="store_true",
                        help="do not reuse the KV cache of shared prompt prefixes")

    server = p.add_argument_group("server")
    server.add_argument("--host", default=s.host, help="address to bind (use 0.0.0.0 to accept remote clients)")
    server.add_argument("--port", type=_number(int, 1, 65535), default=s.port, help="TCP port")
    server.add_argument("--num-tokenizers", type=_number(int, 1, 64), default=s.num_tokenizers,
                        help="tokenizer worker processes")
    # The environment is read after parsing, so --help never shows the key.
    server.add_argument("--api-key", default=None,
                        help=f"require 'Authorization: Bearer KEY' on /v1 and /generate (also ${API_KEY_ENV})")
    server.add_argument("--log-level", choices=LOG_LEVELS, default=s.log_level, type=str.lower,
                        help="logging level")
    p.set_defaults(run=run_serve)


def server_config(args: argparse.Namespace) -> ServerConfig:
    engine = EngineConfig(
        model=args.model, load_format=args.load_format, device=args.device, dtype=args.dtype,
        tp_size=args.tp_size, page_size=args.page_size, kv_cache_memory=args.kv_cache_memory,
        gpu_memory_fraction=args.gpu_memory_utilization, max_num_batched_tokens=args.max_num_batched_tokens,
        max_running_requests=args.max_running_requests, max_model_len=args.max_model_len,
        enable_prefix_cache=not args.disable_prefix_cache, chat_template=args.chat_template, seed=args.seed,
    )
    return ServerConfig(engine=engine, host=args.host, port=args.port, served_model_name=args.served_model_name,
                        num_tokenizers=args.num_tokenizers, api_key=_api_key(args), log_level=args.log_level)


def _api_key(args: argparse.Namespace) -> str | None:
    return args.api_key or os.environ.get(API_KEY_ENV) or None


def run_serve(args: argparse.Namespace) -> int:
    from minisrv.launch import serve  # imports the engine stack; keep `minisrv --help` light

    return serve(server_config(args))


def register_chat(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "chat", help="chat with a running server in the terminal",
        description="An interactive chat against a running minisrv (or any OpenAI-compatible) server. "
                    "Replies stream as they are generated; /reset clears the history, /exit quits.",
        formatter_class=_HelpFormatter,
    )
    p.error = functools.partial(_one_line_error, p)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL")
    p.add_argument("--model", default=None, help="model name to send (default: the server's only model)")
    p.add_argument("--api-key", default=None, help=f"API key (also ${API_KEY_ENV})")
    p.add_argument("--system", default=None, help="a system prompt to start every conversation with")
    p.add_argument("--max-tokens", type=_number(int, 1), default=None, help="most tokens per reply")
    p.add_argument("--temperature", type=_number(float, 0), default=None, help="sampling temperature")
    p.set_defaults(run=run_chat_command)


def run_chat_command(args: argparse.Namespace) -> int:
    from minisrv.server.chat import ChatSession, run_chat

    session = ChatSession(args.url, model=args.model, api_key=_api_key(args), system=args.system,
                          max_tokens=args.max_tokens, temperature=args.temperature)
    return run_chat(session, input, sys.stdout)
