"""`minisrv run-batch` end to end on the embedded model: every line answered, in order, as the engine answers it
offline; a batch cut short by a signal exits 1; bad files are a clear error before anything starts."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from minisrv import LLM, SamplingParams
from minisrv.models.embedded import EMBEDDED_MODEL_NAME

PROMPTS = ["The capital of France is", "1, 2, 3, 4,", "Once upon a time"]


def run_batch(tmp_path: Path, lines: list[str], *flags: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    done = subprocess.run([sys.executable, "-m", "minisrv.cli", "run-batch", "-i", str(tmp_path / "in.jsonl"),
                           "-o", str(tmp_path / "out.jsonl"), *flags], capture_output=True, text=True, timeout=600)
    out = tmp_path / "out.jsonl"
    return done, [json.loads(x) for x in out.read_text().splitlines()] if out.exists() else []


def test_every_line_is_answered_in_order_as_the_engine_answers_it(tmp_path: Path) -> None:
    completions = [json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions", "body": {
        "model": EMBEDDED_MODEL_NAME, "prompt": p, "max_tokens": 12, "temperature": 0}}) for i, p in enumerate(PROMPTS)]
    chat = json.dumps({"custom_id": "chat", "method": "POST", "url": "/v1/chat/completions", "body": {
        "model": EMBEDDED_MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}})
    refused = json.dumps({"custom_id": "bad", "method": "POST", "url": "/v1/completions", "body": {
        "model": EMBEDDED_MODEL_NAME, "prompt": "x", "temperature": -1}})
    done, out = run_batch(tmp_path, [*completions, "{not json", chat, refused], "--max-num-seqs", "2")
    assert done.returncode == 0, done.stderr
    assert [o["custom_id"] for o in out] == ["c0", "c1", "c2", None, "chat", "bad"]
    expected = LLM().generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=12))
    assert [o["response"]["body"]["choices"][0]["text"] for o in out[:3]] == [e.text for e in expected]
    assert out[3]["response"] is None and out[3]["error"]["message"].startswith("line 4: not JSON")
    assert out[4]["response"]["status_code"] == 200 and out[4]["response"]["body"]["usage"]["completion_tokens"] == 4
    assert out[5]["response"]["status_code"] == 400 and out[5]["response"]["body"]["error"]["param"] == "temperature"
    assert "the batch is done (4 answered 200, 1 not a request, 1 refused 400)" in done.stderr


def test_a_batch_cut_short_by_a_signal_exits_1(tmp_path: Path) -> None:
    long = json.dumps({"custom_id": "long", "method": "POST", "url": "/v1/completions", "body": {
        "model": EMBEDDED_MODEL_NAME, "prompt": "Tell", "max_tokens": 4000, "ignore_eos": True}})
    (tmp_path / "in.jsonl").write_text(long + "\n")
    process = subprocess.Popen([sys.executable, "-m", "minisrv.cli", "run-batch", "-i", str(tmp_path / "in.jsonl"),
                                "-o", str(tmp_path / "out.jsonl")], stderr=subprocess.PIPE, text=True)
    for line in process.stderr:
        if "running the batch" in line:
            break
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    stderr = process.stderr.read()
    assert process.wait(60) == 1 and "1 output lines written (1 answered 200)" in stderr
    (answer,) = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert answer["response"]["body"]["choices"][0]["finish_reason"] == "abort"   # as a server's streams end


def test_files_that_cannot_be_read_or_written_are_a_clear_error(tmp_path: Path) -> None:
    done, _ = run_batch(tmp_path, [])
    missing = subprocess.run([sys.executable, "-m", "minisrv.cli", "run-batch", "-i", str(tmp_path / "nope.jsonl"),
                              "-o", str(tmp_path / "out.jsonl")], capture_output=True, text=True)
    assert missing.returncode == 2
    assert "input_file (--input-file): No such file or directory" in missing.stderr
    unwritable = subprocess.run([sys.executable, "-m", "minisrv.cli", "run-batch", "-i", str(tmp_path / "in.jsonl"),
                                 "-o", str(tmp_path / "no" / "out.jsonl")], capture_output=True, text=True)
    assert unwritable.returncode == 2 and "output_file (--output-file)" in unwritable.stderr
    assert done.returncode == 0, done.stderr   # an empty batch is done at once
