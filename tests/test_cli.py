"""The `minisrv` command: subcommands, and `serve`'s flags: every setting has one, each reaches the config, bad
values are one-line errors."""
from __future__ import annotations

import dataclasses
import random
import subprocess
import sys
import typing

import pytest

from minisrv import __version__
from minisrv.cli import build_parser, main, run_serve, server_config
from minisrv.config import EngineConfig, ServerConfig, flag_name


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"minisrv {__version__}"


def test_help_lists_subcommands() -> None:
    out = subprocess.run([sys.executable, "-m", "minisrv.cli", "--help"], capture_output=True, text=True, check=True)
    assert "usage: minisrv" in out.stdout
    assert "serve" in out.stdout


def test_unknown_subcommand_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2
    assert "invalid choice: 'frobnicate'" in capsys.readouterr().err


SERVE_FLAGS = ["--model", "--served-model-name", "--host", "--port", "--device", "--dtype", "--tp-size",
               "--num-tokenizers", "--max-running-requests", "--max-num-batched-tokens", "--max-model-len",
               "--page-size", "--kv-cache-memory", "--disable-prefix-cache", "--api-key", "--chat-template",
               "--log-level", "--load-format", "--seed", "--gpu-memory-utilization", "--num-pages", "--cpu-threads",
               "--enable-prefix-caching", "--tensor-parallel-size", "--max-num-seqs", "--block-size",
               "--context-length", "--mem-fraction-static", "--disable-radix-cache"]
SETTINGS = [(cls, f) for cls in (EngineConfig, ServerConfig) for f in dataclasses.fields(cls) if "help" in f.metadata]


def parse(argv: list[str]):
    return build_parser().parse_args(argv)


def test_defaults_are_the_config_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MINISRV_API_KEY", raising=False)
    assert server_config(parse(["serve"])) == ServerConfig(engine=EngineConfig())


def test_every_flag_reaches_the_config() -> None:
    rng = random.Random(4)
    values = dict(port=rng.randint(1024, 65535), tp=rng.randint(1, 8), tok=rng.randint(1, 8),
                  run=rng.randint(1, 512), batched=rng.randint(64, 8192), max_len=rng.randint(64, 8192),
                  page=rng.choice([8, 16, 32]), kv=round(rng.uniform(0.1, 8), 2), seed=rng.randint(0, 2**40))
    args = parse(["serve", "--model", "/models/x.gguf", "--served-model-name", "x", "--host", "0.0.0.0",
                  "--port", str(values["port"]), "--device", "cpu", "--dtype", "bfloat16",
                  "--tp-size", str(values["tp"]), "--num-tokenizers", str(values["tok"]),
                  "--max-running-requests", str(values["run"]), "--max-num-batched-tokens", str(values["batched"]),
                  "--max-model-len", str(values["max_len"]), "--page-size", str(values["page"]),
                  "--kv-cache-memory", str(values["kv"]), "--disable-prefix-cache", "--api-key", "k",
                  "--chat-template", "t.jinja", "--log-level", "DEBUG", "--load-format", "dummy",
                  "--seed", str(values["seed"]), "--gpu-memory-utilization", "0.5"])
    config = server_config(args)
    e = config.engine
    assert (config.host, config.port, config.served_model_name, config.num_tokenizers, config.api_key,
            config.log_level, config.chat_template) == ("0.0.0.0", values["port"], ("x",), values["tok"], "k",
                                                        "debug", "t.jinja")
    assert (e.model, e.device, e.dtype, e.tp_size, e.max_running_requests, e.max_num_batched_tokens,
            e.max_model_len, e.page_size, e.kv_cache_memory, e.enable_prefix_caching,
            e.load_format, e.seed, e.gpu_memory_utilization) == (
        "/models/x.gguf", "cpu", "bfloat16", values["tp"], values["run"], values["batched"], values["max_len"],
        values["page"], values["kv"], False, "dummy", values["seed"], 0.5)


# Settings whose value is a JSON object that the config parses at once.
JSON_VALUES = {"speculative_config": '{"method": "ngram", "num_speculative_tokens": 3}'}


def _some_value(cls: type, f: dataclasses.Field, rng: random.Random) -> object:
    """A valid value for a setting other than its default, drawn from its type, range and choices."""
    meta, kind = f.metadata, typing.get_type_hints(cls)[f.name]
    if meta["choices"]:
        return rng.choice([c for c in meta["choices"] if c != f.default])
    if kind is bool:
        return not f.default
    if typing.get_origin(kind) is tuple:
        return tuple(f"value-{rng.randrange(1000)}" for _ in range(2))
    allowed = meta["range"]
    if f.name in JSON_VALUES:
        return JSON_VALUES[f.name]
    if allowed is None:
        return f"value_{rng.randrange(1000)}"   # a word: valid for every free string (--metrics-prefix wants one)
    low, high = allowed.low, allowed.high if allowed.high is not None else allowed.low + 1000
    if float in typing.get_args(kind) or kind is float:
        return round(rng.uniform(low + 0.01, high), 2)
    return rng.choice([v for v in range(int(low) + 1, min(int(high), int(low) + 1000) + 1) if v != f.default])


# Settings valid only with others: what makes a value of theirs valid.
COMPANIONS = {
    "ssl_certfile": lambda v: ["--ssl-keyfile", "key.pem"],
    "ssl_keyfile": lambda v: ["--ssl-certfile", "cert.pem"],
    "nnodes": lambda n: ["--tp-size", str(n), "--dist-init-addr", "node0:5000"],
    "node_rank": lambda k: ["--nnodes", str(k + 1), "--tp-size", str(k + 1), "--dist-init-addr", "node0:5000"],
}


@pytest.mark.parametrize("cls, field", SETTINGS, ids=[f.name for _, f in SETTINGS])
def test_every_setting_has_a_flag_and_each_of_its_names_reaches_the_config(cls: type, field: dataclasses.Field,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MINISRV_API_KEY", raising=False)
    value = _some_value(cls, field, random.Random(field.name))
    names = [flag_name(field.name), *field.metadata["flags"]]
    for name in names:
        text = ",".join(value) if isinstance(value, tuple) else str(value)
        argv = [name] if value is True else [f"--no-{name[2:]}"] if value is False else [name, text]
        config = server_config(parse(["serve", *argv, *COMPANIONS.get(field.name, lambda v: [])(value)]))
        assert getattr(config if cls is ServerConfig else config.engine, field.name) == value, name
    for name in field.metadata["negative_flags"]:
        config = server_config(parse(["serve", name]))
        assert getattr(config if cls is ServerConfig else config.engine, field.name) is False, name


def test_served_model_names_as_vllm_takes_them() -> None:
    """Several values after the flag (vLLM's form), commas or a JSON list: one list; the model stays positional."""
    for argv in (["a", "b"], ["a,b"], ['["a", "b"]'], ["a", "b,"]):
        config = server_config(parse(["serve", "--served-model-name", *argv]))
        assert config.served_model_name == ("a", "b") and config.reported_model_name == "a", argv
    args = parse(["serve", "org/model", "--served-model-name", "a", "b", "--port", "9000"])
    assert (args.model_tag, args.served_model_name, args.port) == ("org/model", ("a", "b"), 9000)
    assert server_config(parse(["serve"])).reported_model_name is None


def test_list_flags_take_a_json_list_or_commas(capsys: pytest.CaptureFixture[str]) -> None:
    assert server_config(parse(["serve", "--allowed-origins", '["https://a.example", "http://b:8080"]'])
                         ).allowed_origins == ("https://a.example", "http://b:8080")
    assert server_config(parse(["serve", "--allowed-methods", "GET, POST"])).allowed_methods == ("GET", "POST")
    assert server_config(parse(["serve"])).allowed_origins == ()
    for bad in ('["a", 1]', "[not json"):
        with pytest.raises(SystemExit):
            parse(["serve", "--allowed-origins", bad])
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--allowed-origins" in err


def test_api_key_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MINISRV_API_KEY", "from-env")
    assert server_config(parse(["serve"])).api_key == "from-env"
    assert server_config(parse(["serve", "--api-key", "flag"])).api_key == "flag"
    out = subprocess.run([sys.executable, "-m", "minisrv.cli", "serve", "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert "from-env" not in out   # --help never shows the key


@pytest.mark.parametrize("argv, flag", [
    (["--port", "70000"], "--port"),
    (["--port", "eighty"], "--port"),
    (["--tp-size", "0"], "--tp-size"),
    (["--num-tokenizers", "-1"], "--num-tokenizers"),
    (["--max-model-len", "1.5"], "--max-model-len"),
    (["--kv-cache-memory", "0"], "--kv-cache-memory"),
    (["--device", "tpu"], "--device"),
    (["--dtype", "int3"], "--dtype"),
    (["--log-level", "loud"], "--log-level"),
    (["--page-size", "0"], "--page-size"),
    (["--seed", "-4"], "--seed"),
    (["--load-format", "pt"], "--load-format"),
    (["--gpu-memory-utilization", "0"], "--gpu-memory-utilization"),
    (["--mem-fraction-static", "1.5"], "--mem-fraction-static"),
    (["--cpu-threads", "0"], "--cpu-threads"),
    (["--num-pages", "0"], "--num-pages"),
])
def test_bad_values_are_one_line_errors(argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse(["serve", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and flag in err and err.startswith("minisrv serve: error: argument")


@pytest.mark.parametrize("argv, flag", [
    (["--tp-size", "2", "--nnodes", "2", "--node-rank", "2", "--dist-init-addr", "h:1"], "--node-rank"),
    (["--tp-size", "2", "--nnodes", "2"], "--dist-init-addr"),
    (["--tp-size", "2", "--nnodes", "2", "--dist-init-addr", "node0"], "--dist-init-addr"),
    (["--tp-size", "3", "--nnodes", "2", "--dist-init-addr", "h:1"], "--nnodes"),
    (["--tp-size", "2", "--nnodes", "2", "--dist-init-addr", "h:1", "--dp-size", "2"], "--dp-size"),
    (["--api-server-count", "3", "--num-tokenizers", "2"], "--num-tokenizers"),
    (["--metrics-prefix", "my-server"], "--metrics-prefix"),
    (["--ssl-certfile", "cert.pem"], "--ssl-keyfile"),
    (["--ssl-keyfile", "key.pem"], "--ssl-certfile"),
    (["--ssl-keyfile", "/nowhere/key.pem", "--ssl-certfile", "/nowhere/cert.pem"], "--ssl-certfile"),
    (["--speculative-config", "ngram"], "--speculative-config"),
    (["--speculative-config", '{"method": "eagle", "num_speculative_tokens": 2}'], "--speculative-config"),
    (["--speculative-config", '{"method": "ngram"}'], "--speculative-config"),
    (["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 0}'], "--speculative-config"),
    (["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 2, "model": "x"}'],
     "--speculative-config"),
    (["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 6}'],
     "--speculative-config"),
])
def test_contradicting_settings_are_one_line_errors(argv: list[str], flag: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert run_serve(parse(["serve", *argv])) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and flag in err and err.startswith("minisrv serve: error: ")


def test_help_documents_every_flag() -> None:
    out = subprocess.run([sys.executable, "-m", "minisrv.cli", "serve", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for flag in SERVE_FLAGS + [flag_name(f.name) for _, f in SETTINGS]:
        assert flag in out, flag
    chat = subprocess.run([sys.executable, "-m", "minisrv.cli", "chat", "--help"], capture_output=True, text=True,
                          check=True).stdout
    assert "--url" in chat and "/reset" in chat


def test_serve_runs_the_launcher_with_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    import minisrv.runtime.launch

    seen = []
    monkeypatch.setattr(minisrv.runtime.launch, "serve", lambda config: seen.append(config) or 3)

    assert main(["serve", "--port", "8123", "--num-tokenizers", "2"]) == 3
    assert seen[0].port == 8123 and seen[0].num_tokenizers == 2
    # The model as vLLM's `vllm serve MODEL` takes it: the same as --model, and once.
    assert main(["serve", "org/model", "--port", "8124"]) == 3 and seen[1].engine.model == "org/model"
    assert main(["serve", "org/model", "--model", "org/model"]) == 3 and seen[2].engine.model == "org/model"
    assert main(["serve", "org/model", "--model", "org/other"]) == 2 and len(seen) == 3


@pytest.mark.parametrize("device, cores, tokenizers, expected", [
    ("cpu", 16, None, (1, 1)), ("cuda", 16, None, (2, 2)), ("cuda", 4, None, (1, 1)), ("cuda", 16, 1, (1, 1)),
    ("cuda", 16, 3, (2, 3))])
def test_api_server_count_defaults_to_two_on_a_gpu_host_with_cores_to_spare(
        device: str, cores: int, tokenizers: int | None, expected: tuple[int, int],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("minisrv.config.usable_cores", lambda: cores)
    config = ServerConfig(engine=EngineConfig(device=device), num_tokenizers=tokenizers)
    assert (config.resolved_api_server_count(), config.resolved_num_tokenizers()) == expected
    explicit = ServerConfig(engine=EngineConfig(device=device), api_server_count=3)
    assert (explicit.resolved_api_server_count(), explicit.resolved_num_tokenizers()) == (3, 3)
