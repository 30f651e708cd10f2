"""Models on the Hugging Face Hub: `--model org/name` (as `vllm serve org/name`) fetches the files the engine and
the tokenizer read, once, into the Hugging Face cache (HF_HOME, HF_HUB_CACHE; HF_TOKEN for gated models) or
--download-dir, through huggingface_hub, which also resumes broken downloads and works offline from its cache."""
from __future__ import annotations

import re
from pathlib import Path

from minisrv.config import flag_name

REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# What a model directory holds besides its weights: config, generation config, tokenizer, chat template.
TEXT_FILES = ("*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken")
WEIGHT_FILES = ("*.safetensors",)
SKIPPED = ("original/*",)   # some repos carry a second copy of the weights for other runtimes there


def is_repo_id(model: str) -> bool:
    """Whether `model` reads as a Hub repository id (org/name); a path that exists is checked first."""
    return REPO_ID.fullmatch(model) is not None


def fetch(repo_id: str, revision: str | None, download_dir: str | None, weights: bool, field: str = "model") -> Path:
    """The local directory of the repository's files (without the weights unless `weights`); ValueError naming
    `field` and its flag with the Hub's reason when they cannot be had (unknown or gated repository, no connection
    and nothing cached)."""
    from huggingface_hub import snapshot_download

    patterns = [*TEXT_FILES, *(WEIGHT_FILES if weights else ())]
    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=download_dir,
                                      allow_patterns=patterns, ignore_patterns=list(SKIPPED)))
    except Exception as exc:   # the library's own errors say why: not found, gated, offline, bad revision
        reason = " ".join(str(exc).split())[:400] or type(exc).__name__
        raise ValueError(f"{field}: {repo_id!r} could not be fetched from the Hugging Face Hub"
                         f"{f' at revision {revision!r}' if revision else ''}: {reason} "
                         f"({flag_name(field)})") from exc
