"""A load generator for any OpenAI-compatible streaming server: minisrv, vLLM, SGLang, llama.cpp's server.

Random dataset: each request's input and output lengths are drawn uniformly from [len * (1 - ratio),
len * (1 + ratio)] (vLLM's --random-range-ratio), and its prompt is random text that the served model's
tokenizer (--tokenizer) encodes to exactly that many tokens. Requests go out at --request-rate (Poisson
arrivals, or all at once with inf), at most --max-concurrency at a time, after --num-warmups warm-up
requests. Every response is streamed; per request: time to first token (TTFT), time per output token after
the first (TPOT), the gaps between content chunks (ITL) and the end-to-end latency (E2EL). Output tokens
are the server's usage count when it sends one (stream_options.include_usage), else the content chunks.

`--dataset copy` instead asks the model to repeat a passage of its prompt word for word (COPY_PASSAGES, drawn in
turn; the output length is --random-output-len): the work that speculative decoding's n-gram drafts are for.

It prints the block vLLM's `bench serve` prints, and with --json writes those figures under vLLM's key names.

    python bench/serving.py --base-url http://127.0.0.1:8000 --num-prompts 200 --request-rate 16
    python bench/serving.py --endpoint chat --random-input-len 512 --random-output-len 128 --max-concurrency 16 \\
        --json bench/results/serving.json --plot bench/results/serving.png
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass, field

from machine import machine

ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
COPY_PASSAGES = (
    "The committee met on Tuesday to review the budget for the coming year. It agreed to raise the spending on "
    "schools by four percent, to keep the spending on roads as it was, and to set aside a small fund for repairs to "
    "the old library on Main Street.",
    "To reset the router, unplug it from the wall, wait thirty seconds, and plug it back in. When the light on the "
    "front turns green, open the settings page and enter the password printed on the label under the router.",
    "The bakery opens at seven in the morning and closes at six in the evening. On Sundays it opens at nine and "
    "sells only bread, rolls and the apple cake that the owner's mother first baked forty years ago.",
    "Patients should not eat or drink anything after midnight before the operation. They should bring a list of "
    "the medicines they take, wear loose clothes, and ask a friend or relative to drive them home afterwards.",
)


@dataclass
class RequestResult:
    input_tokens: int
    ok: bool = False
    error: str = ""
    ttft: float = 0.0
    e2el: float = 0.0
    output_tokens: int = 0
    itls: list[float] = field(default_factory=list)


# --- prompts ------------------------------------------------------------------------------------------------

def load_tokenizer(name: str):
    """A Hugging Face tokenizer (a directory or hub id), or the one minisrv serves for "embedded" or a preset
    served with --load-format dummy (its byte-level vocabulary)."""
    from minisrv.models.dummy import preset_names

    if name == "embedded" or name in preset_names():
        from minisrv.config import EngineConfig
        from minisrv.models.source import resolve_source
        from minisrv.tokenizer.loading import load_tokenizer as load_minisrv_tokenizer

        fmt = "auto" if name == "embedded" else "dummy"
        return load_minisrv_tokenizer(resolve_source(EngineConfig(model=name, load_format=fmt)))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name)


def exact_prompt(tokenizer, length: int, rng: random.Random) -> str:
    """Random text that `tokenizer` encodes (without special tokens) to exactly `length` tokens."""
    special = set(tokenizer.all_special_ids)
    vocab = [i for i in range(len(tokenizer)) if i not in special]
    for attempt in range(2):
        ids = [rng.choice(vocab) for _ in range(length)]
        for _ in range(10):
            text = tokenizer.decode(ids, skip_special_tokens=True)
            ids = tokenizer.encode(text, add_special_tokens=False)
            if len(ids) == length:
                return text
            # Re-encoding merges or splits pieces: cut, or pad with more random ids, and try again.
            ids = ids[:length] + [rng.choice(vocab) for _ in range(length - len(ids))]
        # A byte-level vocabulary's random bytes are rarely valid UTF-8: keep to ids that survive a round trip.
        vocab = [i for i in rng.sample(vocab, min(len(vocab), 20000))
                 if tokenizer.encode(tokenizer.decode([i]), add_special_tokens=False) == [i]]
    raise SystemExit(f"could not make a prompt of exactly {length} tokens with this tokenizer")


def copy_prompt(passage: str) -> str:
    return f"Repeat the following text word for word.\nText: {passage}\nRepeated text:"


def lengths(mean: int, ratio: float, count: int, rng: random.Random) -> list[int]:
    low, high = max(1, int(mean * (1 - ratio))), max(1, int(mean * (1 + ratio)))
    return [rng.randint(low, high) for _ in range(count)]


# --- requests -----------------------------------------------------------------------------------------------

def request_body(args: argparse.Namespace, model: str, prompt: str, output_len: int) -> dict:
    body: dict = {"model": model, "max_tokens": output_len, "stream": True, "temperature": args.temperature,
                  "stream_options": {"include_usage": True}}
    if args.ignore_eos:
        body["ignore_eos"] = True   # vLLM, SGLang and minisrv accept it; OpenAI itself does not
    if args.logprobs is not None:
        body["logprobs"] = args.logprobs if args.endpoint == "completions" else True
        if args.endpoint == "chat":
            body["top_logprobs"] = args.logprobs
    if args.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body


def names_a_token(logprobs: dict) -> bool:
    """Whether a chunk's logprobs name at least one token (completions: tokens; chat: content)."""
    return bool(logprobs.get("tokens") or logprobs.get("content"))


async def send(session, url: str, body: dict, result: RequestResult) -> RequestResult:
    start = time.perf_counter()
    last = start
    chunks = usage_tokens = 0
    try:
        async with session.post(url, json=body) as response:
            if response.status != 200:
                result.error = f"HTTP {response.status}: {(await response.text())[:200]}"
                return result
            async for raw in response.content:
                line = raw.strip()
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if event.get("usage"):
                    usage_tokens = event["usage"]["completion_tokens"]
                choices = event.get("choices") or []
                if not choices:
                    continue
                piece = choices[0].get("text") if "text" in choices[0] else (choices[0].get("delta") or {}).get(
                    "content")
                # A token whose bytes are not text yet still shows in its chunk's logprobs (with --logprobs).
                if not piece and not (choices[0].get("logprobs") and names_a_token(choices[0]["logprobs"])):
                    continue
                now = time.perf_counter()
                if chunks == 0:
                    result.ttft = now - start
                else:
                    result.itls.append(now - last)
                last, chunks = now, chunks + 1
    except Exception as exc:  # noqa: BLE001 - every failure is counted and reported, never fatal to the run
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.e2el = time.perf_counter() - start
    result.output_tokens = usage_tokens or chunks
    result.ok = chunks > 0
    if not result.ok:
        result.error = "no content in the response"
    return result


async def run(args: argparse.Namespace, model: str, warmups: list[tuple[str, int, int]],
              prompts: list[tuple[str, int, int]]) -> tuple[list, float]:
    import aiohttp
    from tqdm import tqdm

    url = args.base_url.rstrip("/") + ENDPOINTS[args.endpoint]
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, headers=headers) as session:
        await asyncio.gather(*(send(session, url, request_body(args, model, p, o), RequestResult(i))
                               for p, i, o in warmups))
        limit = asyncio.Semaphore(args.max_concurrency or len(prompts))
        progress = tqdm(total=len(prompts), desc="requests", disable=args.no_progress)
        rng = random.Random(args.seed + 1)

        async def one(prompt: str, input_len: int, output_len: int) -> RequestResult:
            async with limit:
                result = await send(session, url, request_body(args, model, prompt, output_len),
                                    RequestResult(input_len))
            progress.update()
            return result

        tasks = []
        start = time.perf_counter()
        for prompt, input_len, output_len in prompts:
            tasks.append(asyncio.create_task(one(prompt, input_len, output_len)))
            if args.request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(args.request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        progress.close()
    return results, duration


# --- report -------------------------------------------------------------------------------------------------

def percentile(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def summarize(results: list[RequestResult], duration: float) -> dict:
    ok = [r for r in results if r.ok]
    inputs, outputs = sum(r.input_tokens for r in ok), sum(r.output_tokens for r in ok)
    figures = {"completed": len(ok), "failed": len(results) - len(ok), "duration": duration,
               "total_input_tokens": inputs, "total_output_tokens": outputs,
               "request_throughput": len(ok) / duration, "output_throughput": outputs / duration,
               "total_token_throughput": (inputs + outputs) / duration}
    series = {"ttft": [r.ttft for r in ok],
              "tpot": [(r.e2el - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1],
              "itl": [gap for r in ok for gap in r.itls], "e2el": [r.e2el for r in ok]}
    for name, values in series.items():
        ms = [v * 1e3 for v in values]
        figures[f"mean_{name}_ms"] = statistics.fmean(ms) if ms else 0.0
        figures[f"median_{name}_ms"] = statistics.median(ms) if ms else 0.0
        figures[f"p99_{name}_ms"] = percentile(ms, 99)
        figures[f"max_{name}_ms"] = max(ms, default=0.0)
    figures["errors"] = sorted({r.error for r in results if not r.ok})[:5]
    return figures


def report(f: dict) -> str:
    rows = [("Successful requests:", f["completed"]), ("Failed requests:", f["failed"]),
            ("Benchmark duration (s):", f"{f['duration']:.2f}"), ("Total input tokens:", f["total_input_tokens"]),
            ("Total generated tokens:", f["total_output_tokens"]),
            ("Request throughput (req/s):", f"{f['request_throughput']:.2f}"),
            ("Output token throughput (tok/s):", f"{f['output_throughput']:.2f}"),
            ("Total Token throughput (tok/s):", f"{f['total_token_throughput']:.2f}")]
    lines = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="=")]
    lines += [f"{label:<40}{value:<10}" for label, value in rows]
    for name, title in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st token)"),
                        ("itl", "Inter-token Latency"), ("e2el", "End-to-end Latency")):
        lines.append("{s:{c}^{n}}".format(s=title, n=50, c="-"))
        label = name.upper()
        lines += [f"{'Mean ' + label + ' (ms):':<40}{f['mean_' + name + '_ms']:<10.2f}",
                  f"{'Median ' + label + ' (ms):':<40}{f['median_' + name + '_ms']:<10.2f}",
                  f"{'P99 ' + label + ' (ms):':<40}{f['p99_' + name + '_ms']:<10.2f}",
                  f"{'Max ' + label + ' (ms):':<40}{f['max_' + name + '_ms']:<10.2f}"]
    lines.append("=" * 50)
    return "\n".join(lines)


def plot(results: list[RequestResult], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r.ok]
    series = {"TTFT": [r.ttft * 1e3 for r in ok],
              "TPOT": [(r.e2el - r.ttft) / (r.output_tokens - 1) * 1e3 for r in ok if r.output_tokens > 1],
              "ITL": [gap * 1e3 for r in ok for gap in r.itls], "E2E latency": [r.e2el * 1e3 for r in ok]}
    fig, axes = plt.subplots(1, 4, figsize=(18, 3.8))
    for ax, (name, values) in zip(axes, series.items()):
        ax.hist(values, bins=50, color="tab:blue")
        ax.set(xlabel=f"{name} (ms)", ylabel="count", title=f"{name}: median {statistics.median(values or [0]):.1f} ms")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--endpoint", choices=sorted(ENDPOINTS), default="completions")
    parser.add_argument("--model", help="the model name to send (default: the first of GET /v1/models)")
    parser.add_argument("--tokenizer", default="embedded",
                        help="the served model's tokenizer: a Hugging Face directory or id, or 'embedded' "
                             "(minisrv's default model)")
    parser.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY'")
    parser.add_argument("--dataset", choices=("random", "copy"), default="random")
    parser.add_argument("--num-prompts", type=int, default=100)
    parser.add_argument("--random-input-len", type=int, default=256)
    parser.add_argument("--random-output-len", type=int, default=64)
    parser.add_argument("--random-range-ratio", type=float, default=0.0,
                        help="lengths drawn uniformly from [len * (1 - r), len * (1 + r)]")
    parser.add_argument("--request-rate", type=float, default=float("inf"),
                        help="requests per second, Poisson arrivals (inf: all at once)")
    parser.add_argument("--max-concurrency", type=int, help="requests in flight at most (default: no limit)")
    parser.add_argument("--num-warmups", type=int, default=2)
    parser.add_argument("--ignore-eos", action="store_true", help="ask for exactly the output length")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--logprobs", type=int, help="ask for logprobs, so every token makes a chunk even when its "
                                                     "bytes are not text yet (dummy models' byte vocabulary)")
    parser.add_argument("--seed", type=int, default=0,
                        help="picks the prompts, with --num-prompts and --num-warmups: a run repeating all three sends "
                             "the same prompts, which a server's prefix cache may hold from the last run")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per request")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--json", metavar="PATH", help="write the figures under vLLM's key names")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG of the latency distributions")
    args = parser.parse_args()
    for name in ("num_prompts", "random_input_len", "random_output_len"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 <= args.random_range_ratio < 1:
        parser.error("--random-range-ratio must be in [0, 1)")
    if args.request_rate <= 0:
        parser.error("--request-rate must be > 0 (inf: all at once)")

    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    model = args.model or httpx.get(args.base_url.rstrip("/") + "/v1/models", headers=headers).json()["data"][0]["id"]
    tokenizer = load_tokenizer(args.tokenizer)
    rng = random.Random(args.seed)
    count = args.num_prompts + args.num_warmups
    ins = lengths(args.random_input_len, args.random_range_ratio, count, rng)
    outs = lengths(args.random_output_len, args.random_range_ratio, count, rng)
    if args.dataset == "copy":
        texts = [copy_prompt(COPY_PASSAGES[k % len(COPY_PASSAGES)]) for k in range(count)]
        prompts = [(t, len(tokenizer.encode(t, add_special_tokens=False)), o) for t, o in zip(texts, outs)]
    else:
        prompts = [(exact_prompt(tokenizer, i, rng), i, o) for i, o in zip(ins, outs)]
    warmups, prompts = prompts[: args.num_warmups], prompts[args.num_warmups:]
    import uvloop

    results, duration = uvloop.run(run(args, model, warmups, prompts))
    figures = summarize(results, duration)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "model": model, "base_url": args.base_url, "endpoint": args.endpoint,
                       "settings": {k: v for k, v in vars(args).items() if k not in ("json", "plot", "api_key")},
                       **figures}, f, indent=1)
    if args.plot:
        plot(results, args.plot)
    if figures["errors"]:
        print("errors (first kinds):", *figures["errors"], sep="\n  ")
    print(report(figures))


if __name__ == "__main__":
    main()
