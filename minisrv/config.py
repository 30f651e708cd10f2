"""Engine and server settings: one dataclass each, every field declared once with its flag and help.

Each field's metadata (see `setting`) is the single declaration of that setting: the dataclass
validates itself from it, and `minisrv serve` builds its flags from it (minisrv/cli.py). A flag is the
field's name in dashes; `flags` adds the names vLLM and SGLang users know for the same setting.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

from minisrv.fields import Range, validate_fields

DEFAULT_MODEL = "embedded"  # SmolLM2-135M-Instruct, fetched and converted on first use
# On a 2-core VM, 16 streams meeting a burst of 16 prompts (README): a prefill token cost about 0.9 ms there in
# float32, so the largest gap between two tokens of a stream was 2.9-3.0 s uncapped, 0.30 s at 256 and
# 0.18-0.20 s at 128, the median first token 1.9-2.2 s -> 0.6-0.9 s, the p99 first token and tokens/s unchanged.
# A GPU step prefills thousands of tokens in milliseconds: no cap there.
CPU_MAX_PREFILL_TOKENS = 128
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
# The call formats tool_choice "auto" finds, by vLLM's parser names
TOOL_CALL_FORMATS = ("hermes", "llama3_json", "mistral", "pythonic")
FP8_KV_CACHE_DTYPES = ("fp8", "fp8_e4m3")        # --kv-cache-dtype's 8-bit names (vLLM's), both e4m3
REASONING_PARSERS = ("qwen3", "deepseek_r1")    # how a reasoning model marks its thinking, by vLLM's parser names
# One H200 machine (16 cores), llama-3.2-1b at 128 streams: served median inter-token latency 8.5-10.3 ms with one
# API server process against a 2.1 ms engine step, 2.6-3.1 ms with two; the same at 16 streams. The CPU engine
# streams a few hundred tokens/s, which one process writes with ease.
GPU_API_SERVERS = 2
GPU_API_SERVERS_MIN_CORES = 8
GRAMMAR_PROCESSES = 2   # --grammar-process's processes: four were no faster than two on the H200 machine


def setting(default: Any, help: str, *, group: str, flags: tuple[str, ...] = (), range: Range | None = None,
            choices: tuple[str, ...] | None = None, negative_flags: tuple[str, ...] = (),
            env: str | None = None, secret: bool = False) -> Any:
    """A config field. `negative_flags` set a boolean to False; `env` is read when the flag is not given;
    a `secret` value is never shown in --help."""
    return field(default=default, metadata=dict(help=help, group=group, flags=flags, range=range, choices=choices,
                                                negative_flags=negative_flags, env=env, secret=secret))


def reported_settings(config: type | object) -> list[str]:
    """The names of the settings a server may report of a config (class or instance): those with a flag's help,
    none secret."""
    return [f.name for f in dataclasses.fields(config) if "help" in f.metadata and not f.metadata["secret"]]


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _name_the_flag(f: Any) -> str:
    return f" ({flag_name(f.name)})"


@dataclass
class EngineConfig:
    """Everything the engine (model, KV cache, scheduler, sampler) needs; picklable for spawn."""

    model: str = setting(
        DEFAULT_MODEL, group="model", flags=("--model-path",),
        help="'embedded' (SmolLM2-135M-Instruct, fetched on first use), a Hugging Face model directory, "
             "a Hugging Face Hub model id (org/name, fetched into the Hugging Face cache on first use), "
             "a .gguf file, or a preset name with --load-format dummy")
    revision: str | None = setting(
        None, group="model", help="the Hub model's branch, tag or commit (default: main)")
    download_dir: str | None = setting(
        None, group="model", help="where Hub models are kept (default: the Hugging Face cache, HF_HOME)")
    tokenizer: str | None = setting(
        None, group="model", flags=("--tokenizer-path",),
        help="a Hugging Face directory or Hub id (org/name) whose tokenizer, chat template and end-of-sequence "
             "tokens replace the model's; with --load-format dummy it gives a preset a real vocabulary")
    tokenizer_revision: str | None = setting(
        None, group="model", help="the Hub tokenizer's branch, tag or commit (default: main)")
    load_format: str = setting(
        "auto", group="model", choices=("auto", "dummy"),
        help="'dummy': random weights for a preset config (benchmarks without weights)")
    dtype: str = setting(
        "auto", group="model", choices=("auto", "float32", "bfloat16", "float16"),
        help="weight and activation dtype; auto: bfloat16 on CUDA and on CPUs that multiply it natively (AMX, "
             "AVX512-BF16), else float32")
    max_model_len: int | None = setting(
        None, group="model", flags=("--context-length",), range=Range(1),
        help="context length: prompt plus output tokens (default: the model's)")
    seed: int = setting(
        0, group="model", range=Range(0, 2**63 - 1),
        help="seeds dummy weights and the seeds drawn for requests that give none")
    device: str = setting(
        "auto", group="engine", choices=("auto", "cpu", "cuda"), help="auto: cuda when a GPU is visible, else cpu")
    tp_size: int = setting(
        1, group="parallel", flags=("--tensor-parallel-size", "-tp"), range=Range(1),
        help="tensor-parallel ranks (one scheduler process per GPU; on the CPU, ranks share the cores)")
    dp_size: int = setting(
        1, group="parallel", flags=("--data-parallel-size", "-dp"), range=Range(1, 64),
        help="scheduler replicas behind the one API server, each on its own GPU (or --tp-size GPUs); a request "
             "goes to the least loaded, or to one whose prefix cache holds its prompt's start")
    custom_all_reduce: bool = setting(
        True, group="parallel", negative_flags=("--disable-custom-all-reduce",),
        help="on one host's GPUs, the small all-reduces of decode steps through peer memory (one kernel, a few "
             "microseconds) instead of NCCL; larger ones always take NCCL")
    nnodes: int = setting(
        1, group="parallel", range=Range(1),
        help="hosts the tensor-parallel ranks span, --tp-size / --nnodes each; node 0 also runs the API server, "
             "tokenizers and detokenizer")
    node_rank: int = setting(0, group="parallel", range=Range(0), help="this host's index among --nnodes")
    dist_init_addr: str | None = setting(
        None, group="parallel",
        help="host:port on node 0 where the ranks meet (torch.distributed's TCP store); needed with --nnodes > 1")
    max_running_requests: int = setting(
        256, group="engine", flags=("--max-num-seqs",), range=Range(1),
        help="most requests in the running batch at once")
    max_num_batched_tokens: int = setting(
        2048, group="engine", flags=("--chunked-prefill-size",), range=Range(1),
        help="per-step token budget (prefill chunks plus decode tokens)")
    max_prefill_tokens: int | None = setting(
        None, group="engine", range=Range(1),
        help="prompt tokens a step may prefill while other requests decode (their next token waits for the whole "
             "step); the whole --max-num-batched-tokens when nothing decodes. Lower: steadier streams during "
             f"prompt bursts (default: {CPU_MAX_PREFILL_TOKENS} on the CPU, no cap on CUDA)")
    page_size: int = setting(
        16, group="engine", flags=("--block-size",), range=Range(1, 1024), help="tokens per KV cache page")
    kv_cache_memory: float | None = setting(
        None, group="engine", range=Range(0, low_open=True),
        help="GiB for the KV cache (default: a fixed size on CPU, --gpu-memory-utilization of free memory on CUDA)")
    num_pages: int | None = setting(
        None, group="engine", flags=("--num-gpu-blocks-override",), range=Range(1),
        help="KV cache size in pages; wins over --kv-cache-memory")
    gpu_memory_utilization: float = setting(
        0.85, group="engine", flags=("--mem-fraction-static", "--mem-fraction"), range=Range(0, 1, low_open=True),
        help="share of the GPU memory free after the weights and the CUDA graphs that the KV cache takes")
    kv_cache_dtype: str = setting(
        "auto", group="engine", choices=("auto", *FP8_KV_CACHE_DTYPES),
        help="how the KV cache stores keys and values: in the model's dtype (auto), or in 8-bit floats (fp8, "
             "e4m3 with a scale of 1, as vLLM's without calibrated scales): half the bytes a token, so twice the "
             "tokens fit, read back in the model's dtype by attention")
    enable_prefix_caching: bool = setting(
        True, group="engine", negative_flags=("--disable-prefix-cache", "--disable-radix-cache"),
        help="reuse the KV cache of shared prompt prefixes")
    kernel_backend: str = setting(
        "auto", group="engine", choices=("auto", "cuda", "torch"),
        help="ops for norms, RoPE, attention and sampling: the CUDA kernels of csrc/ (needs CuPy) or PyTorch's; "
             "auto: cuda on a CUDA device where CuPy is installed")
    enable_cuda_graph: bool = setting(
        True, group="engine", negative_flags=("--disable-cuda-graph", "--enforce-eager"),
        help="replay decode steps as CUDA graphs, one per batch-size bucket (CUDA kernels only)")
    cuda_graph_max_bs: int = setting(
        256, group="engine", range=Range(1), help="largest decode batch with a CUDA graph (rounded up to a bucket)")
    scheduling_policy: str = setting(
        "fcfs", group="engine", choices=("fcfs", "priority"),
        help="which waiting request runs first: the earliest (fcfs), or the one of the lowest `priority` value, then "
             "the earliest (priority, vLLM's: a request's priority field is taken, and the running request of the "
             "highest value, then the latest, is preempted first when memory runs short)")
    grammar_process: str = setting(
        "auto", group="engine", choices=("auto", "on", "off"),
        help=f"advance structured output's grammars and fill their token masks in {GRAMMAR_PROCESSES} processes of "
             "their own, off the engine thread (on a GPU at batch 64, constrained steps 0.88-1.00x as long as with "
             "them in the engine's process); auto: on for a CUDA device without tensor parallelism")
    overlap_schedule: bool = setting(
        True, group="engine", negative_flags=("--disable-overlap", "--disable-overlap-schedule"),
        help="on CUDA, schedule and prepare step N+1 while the GPU runs step N")
    quantization: str = setting(
        "auto", group="engine", choices=("auto", "none", "int8", "int8-lm-head", "int8-weight-only", "int4"),
        help="CPU weights in int8 (one scale per output channel): through PyTorch's dynamic int8 linear, every "
             "projection and the LM head (int8) or the LM head alone (int8-lm-head); or weight-only, with "
             "bfloat16 activations, for decode steps of up to 4 rows (int8-weight-only; int4: projections in 4 bits "
             "with a scale and a zero per 32 input columns, the LM head in 8); quality per model: "
             "bench/perplexity.py (README). auto: int4 on the CPU for a checkpoint that stores its projections in "
             "4 bits or fewer (a GGUF such as the embedded model's Q4_1), else none")
    cpu_threads: int | None = setting(
        None, group="engine", range=Range(1),
        help="PyTorch intra-op threads of the CPU engine (default: every core it may run on)")
    speculative_config: str | None = setting(
        None, group="engine",
        help="speculative decoding, as vLLM's JSON: '{\"method\": \"ngram\", \"num_speculative_tokens\": 4}' "
             "(prompt_lookup_max, default 5, and prompt_lookup_min, default 2: the n-gram sizes looked up). "
             "A decoding request's last n tokens are looked up in its prompt and output; the tokens that followed "
             "their latest earlier occurrence are checked in the same step as the next token. Each token is drawn "
             "from the same logits, seed and position as without, so the output is the same where every row computes "
             "alike (float32 weights; in bfloat16, or int4 on the CPU, a near-tie can go either way, as when the batch "
             "changes). Requests with penalties or a grammar are not speculated; the engine runs without overlap "
             "scheduling")

    def __post_init__(self) -> None:
        validate_fields(self, _name_the_flag)
        self.speculative = SpeculativeConfig.parse(self.speculative_config)
        if self.node_rank >= self.nnodes:
            raise ValueError(f"node_rank (--node-rank) {self.node_rank}: must be below --nnodes {self.nnodes}")
        if self.nnodes > 1 and self.dp_size > 1:
            raise ValueError(f"dp_size (--dp-size) {self.dp_size}: replicas run on one host; across hosts, put "
                             "one `minisrv serve` per host behind a router (README)")
        if self.nnodes > 1 and self.tp_size % self.nnodes:
            raise ValueError(f"nnodes (--nnodes) {self.nnodes}: must divide --tp-size {self.tp_size} (the same "
                             "number of ranks on every node)")
        if self.nnodes > 1 and not _host_port(self.dist_init_addr):
            raise ValueError(f"dist_init_addr (--dist-init-addr) {self.dist_init_addr!r}: --nnodes > 1 needs the "
                             "host:port of node 0")

    @property
    def ranks_per_node(self) -> int:
        return self.tp_size // self.nnodes

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def resolved_max_prefill_tokens(self) -> int | None:
        if self.max_prefill_tokens is not None:
            return self.max_prefill_tokens
        return CPU_MAX_PREFILL_TOKENS if self.resolved_device() == "cpu" else None

    def resolved_quantization(self, checkpoint_bits: int | None) -> str:
        """`quantization`, with auto resolved for a checkpoint whose projections are stored in `checkpoint_bits`
        bits (None: not quantized). Weights that were 4-bit stay 4-bit: requantized to int4's grid they lose
        almost nothing (the embedded model: +0.42% perplexity), and decode reads a quarter of the bytes."""
        if self.quantization != "auto":
            return self.quantization
        four_bit = checkpoint_bits is not None and checkpoint_bits <= 4
        return "int4" if four_bit and self.resolved_device() == "cpu" else "none"

    def resolved_dtype(self) -> str:
        if self.dtype != "auto":
            return self.dtype
        if self.resolved_device() == "cuda":
            return "bfloat16"
        return "bfloat16" if cpu_multiplies_bfloat16() else "float32"


@dataclass(frozen=True)
class SpeculativeConfig:
    """--speculative-config, parsed: n-gram drafting (vLLM's "ngram" method, SGLang's NGRAM)."""

    num_speculative_tokens: int
    prompt_lookup_max: int = 5
    # A single repeated token predicts poorly: drafted from 1-grams, an open continuation of the embedded model had
    # 4-14% of its drafts right and ran up to 1.15x slower; from 2-grams, 1.02-1.06x (bench/speculative.py, README).
    prompt_lookup_min: int = 2
    method: str = "ngram"

    @classmethod
    def parse(cls, text: str | None) -> SpeculativeConfig | None:
        """The JSON object of --speculative-config, checked; ValueError naming the flag and the key."""
        if text is None:
            return None
        where = f"speculative_config ({flag_name('speculative_config')})"
        try:
            given = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"{where}: not JSON ({exc})") from None
        if not isinstance(given, dict):
            raise ValueError(f"{where}: a JSON object, e.g. {{\"method\": \"ngram\", \"num_speculative_tokens\": 4}}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(given) - known)
        if unknown:
            raise ValueError(f"{where}: unknown key {unknown[0]!r}; known: {', '.join(sorted(known))}")
        if given.get("method") != "ngram":
            raise ValueError(f"{where}: method {given.get('method')!r}: only \"ngram\" (drafts looked up in the "
                             "request's own tokens) is served; draft models, EAGLE and MTP are not")
        if "num_speculative_tokens" not in given:
            raise ValueError(f"{where}: num_speculative_tokens is required")
        for key in known - {"method"}:
            value = given.get(key, 1)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 64:
                raise ValueError(f"{where}: {key} must be an integer in [1, 64], got {value!r}")
        config = cls(**given)
        if config.prompt_lookup_min > config.prompt_lookup_max:
            raise ValueError(f"{where}: prompt_lookup_min {config.prompt_lookup_min} is above prompt_lookup_max "
                             f"{config.prompt_lookup_max}")
        return config


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_multiplies_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 natively, with matrix units (Intel AMX) or vector instructions
    (AVX512-BF16: AMD Zen 4 and later, Intel Cooper Lake), where oneDNN's bfloat16 matmuls outrun float32's:
    16 streams of the embedded model decoded 1.6-1.7x as fast in bfloat16 on a 2-vCPU AMX VM, 1.4-1.55x on a
    2-vCPU AMD EPYC VM with AVX512-BF16, one stream as fast or a little faster. Without either, bfloat16 is
    emulated: 0.5x float32's speed at 16 streams (README)."""
    import torch

    # Private probes, so absent from some builds.
    probes = (getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))
    return any(bool(probe()) for probe in probes if probe is not None)


def _host_port(address: str | None) -> bool:
    host, _, port = (address or "").rpartition(":")
    return bool(host) and port.isdigit() and 0 < int(port) < 65536


API_KEY_ENV = "MINISRV_API_KEY"


@dataclass
class ServerConfig:
    """`minisrv serve`'s settings beyond the engine's."""

    engine: EngineConfig = field(default_factory=EngineConfig)
    served_model_name: tuple[str, ...] = setting(
        (), group="model",
        help="the model's names in the API (default: from --model), several as vLLM takes them (space- or "
             "comma-separated, or a JSON list): a request may send any, responses report the first")
    generation_config: str = setting(
        "auto", group="model", choices=("auto", "vllm"),
        help="defaults for the sampling options a request leaves out (temperature, top_p, top_k, min_p, "
             "repetition_penalty): the model's generation_config.json (auto, as vLLM does) or the neutral ones "
             "(vllm: temperature 1, no top-k, ...)")
    override_generation_config: str | None = setting(
        None, group="model",
        help="a JSON object of those defaults that wins over the model's, e.g. '{\"temperature\": 0.6}' (vLLM's; "
             "with --generation-config vllm, the only defaults)")
    chat_template: str | None = setting(
        None, group="model", help="a Jinja chat template, or a file holding one (default: the model's)")
    host: str = setting("127.0.0.1", group="server", help="address to bind (use 0.0.0.0 to accept remote clients)")
    port: int = setting(8000, group="server", range=Range(1, 65535), help="TCP port")
    api_server_count: int | None = setting(
        None, group="server", range=Range(1, 64),
        help="API server processes sharing the port (as vLLM's): each serves HTTP for the connections the kernel "
             "hands it, so streaming past what one Python process can write (about 30k tokens/s) scales out "
             f"(default: {GPU_API_SERVERS} when the engine runs on GPUs and the host has {GPU_API_SERVERS_MIN_CORES} "
             "cores or more, else 1)")
    num_tokenizers: int | None = setting(
        None, group="server", flags=("--tokenizer-worker-num",), range=Range(1, 64),
        help="tokenizer worker processes, each fed by one API server process (default: one per API server process)")
    ssl_certfile: str | None = setting(
        None, group="server", help="serve HTTPS with this certificate chain (PEM; with --ssl-keyfile), as vLLM")
    ssl_keyfile: str | None = setting(
        None, group="server", help="the private key (PEM) of --ssl-certfile")
    api_key: str | None = setting(
        None, group="server", env=API_KEY_ENV, secret=True,
        help=f"require 'Authorization: Bearer KEY' (X-Api-Key too on /v1/messages) on every route but the health "
             f"checks, /version, /metrics and /openapi.json (also ${API_KEY_ENV})")
    max_choices_per_request: int = setting(
        256, group="server", range=Range(1),
        help="prompts x n that one completions request may ask for (each choice runs as its own request); more "
             "is a 400")
    stream_interval: int = setting(
        1, group="server", range=Range(1, 1024),
        help="tokens per streamed chunk after the first, which is sent at once (as vLLM's and SGLang's): larger "
             "values cost less per token and make streams burstier")
    sse_timestamps: bool = setting(
        False, group="server",
        help="precede each streamed chunk with an SSE comment ': emitted NS', the monotonic clock in ns when the "
             "scheduler produced its first token (for latency measurements on the same host; clients ignore it)")
    allowed_origins: tuple[str, ...] = setting(
        (), group="server",
        help="origins a browser may call this server from (CORS), a JSON list or comma-separated; '*' for any "
             "(default: none, same-origin only)")
    allowed_methods: tuple[str, ...] = setting(
        ("*",), group="server", help="HTTP methods allowed to those origins (CORS), a JSON list or comma-separated")
    allowed_headers: tuple[str, ...] = setting(
        ("*",), group="server", help="request headers allowed to those origins (CORS), a JSON list or comma-separated")
    watchdog_timeout: float = setting(
        300.0, group="server", range=Range(0, low_open=True),
        help="a worker that sends no heartbeat for this many seconds (stopped, or stuck in one step) takes the "
             "server down with a message naming it; /health answers 503 from half of it (at most 10 s)")
    body_read_timeout: float = setting(
        30.0, group="server", range=Range(0, low_open=True),
        help="seconds a client may take to send a request's body; a slower one gets a 408 and is disconnected")
    max_connections: int | None = setting(
        None, group="server", range=Range(1),
        help="open HTTP connections at most; a connection past it gets a 503 and is closed (default: the "
             "process's open-file limit less 256)")
    enable_access_log: bool = setting(
        False, group="server", negative_flags=("--disable-log-requests",),
        help="log one line per HTTP request: client, method, path, status, bytes, duration (never a body)")
    enable_auto_tool_choice: bool = setting(
        True, group="server",
        help="let a request with tools leave the call to the model (tool_choice auto, the default with tools); "
             "vLLM needs this flag for that, minisrv has it on unless --no-enable-auto-tool-choice")
    tool_call_parser: str = setting(
        "auto", group="server", choices=("auto", *TOOL_CALL_FORMATS),
        help="the call formats tool_choice auto finds in the output, by vLLM's parser names: Hermes <tool_call> "
             "blocks (hermes: Qwen2.5, Qwen3), Llama 3.x JSON calls (llama3_json), Mistral's [TOOL_CALLS] JSON "
             "array (mistral), a Python list of calls (pythonic: Llama 3.2's and 4's pythonic templates), or all "
             "(auto)")
    reasoning_parser: str = setting(
        "none", group="server", choices=("none", *REASONING_PARSERS),
        help="split a reasoning model's thinking (<think> ... </think>) out of chat answers into reasoning_content, "
             "by vLLM's parser names: qwen3 (thinking when the output opens with <think>) or deepseek_r1 (the "
             "output starts inside it)")
    trust_remote_code: bool = setting(
        False, group="server",
        help="accepted because vLLM's command lines carry it; it changes nothing, as minisrv runs no code from a "
             "model's repository (its Llama-family model is its own)")
    metrics_prefix: str = setting(
        "minisrv", group="server",
        help="the namespace of /metrics' series, whose names follow vLLM's: 'vllm' gives exactly vLLM's names "
             "(vllm:num_requests_running, ...), so dashboards made for vLLM read them unchanged")
    log_level: str = setting("info", group="server", choices=LOG_LEVELS, help="logging level")

    def __post_init__(self) -> None:
        validate_fields(self, _name_the_flag)
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.metrics_prefix):
            raise ValueError(f"metrics_prefix ({flag_name('metrics_prefix')}) must be letters, digits and underscores, "
                             f"not starting with a digit, got {self.metrics_prefix!r}")
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            given, missing = ("ssl_certfile", "ssl_keyfile")[:: 1 if self.ssl_keyfile is None else -1]
            raise ValueError(f"{given} ({flag_name(given)}) needs {missing} ({flag_name(missing)}): HTTPS takes both")
        if None not in (self.num_tokenizers, self.api_server_count) and self.num_tokenizers < self.api_server_count:
            raise ValueError(f"num_tokenizers (--num-tokenizers) {self.num_tokenizers}: each of --api-server-count "
                             f"{self.api_server_count} API server processes needs a tokenizer worker of its own")

    @property
    def reported_model_name(self) -> str | None:
        """The name responses carry: the first served name, else None (the model's own, known once loaded)."""
        return self.served_model_name[0] if self.served_model_name else None

    @property
    def address(self) -> str:
        """--host and --port as one address, an IPv6 host in brackets."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        """Where clients reach the server."""
        return f"{'https' if self.ssl_certfile else 'http'}://{self.address}"

    def resolved_api_server_count(self) -> int:
        if self.api_server_count is not None:
            return self.api_server_count
        gpu_host = self.engine.resolved_device() == "cuda" and usable_cores() >= GPU_API_SERVERS_MIN_CORES
        wanted = GPU_API_SERVERS if gpu_host else 1
        return wanted if self.num_tokenizers is None else min(wanted, self.num_tokenizers)

    def resolved_num_tokenizers(self) -> int:
        return self.resolved_api_server_count() if self.num_tokenizers is None else self.num_tokenizers
