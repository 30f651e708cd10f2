"""Per-request sampling parameters: the one table that every list of sampling options derives from.

Each field's metadata (`option`) gives its range, its code in records, and its names in the APIs.
From it come SamplingParams' validation, the SAMPLING part of the PROMPT_REQUEST and ENGINE_REQUEST
records (minisrv/wire/records.py), and the sampling fields of the OpenAI schemas
(minisrv/server/protocol.py) and of SGLang's /generate (minisrv/server/sglang.py). Adding an option
here puts it in all of them; the engine's sampler is then the one other place to change.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from minisrv.fields import Range, validate_fields

MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS = 100.0   # OpenAI's bound on a logit_bias value
Api = Literal["openai", "sglang"]


def option(default: Any, wire: str, range: Range | None = None, *, openai: bool = True,
           sglang: str | None = "") -> Any:
    """A sampling option. `wire`: its struct code in records ("d", "i", "I", "Q", "B", "?"), "ids" for a
    list of token ids, "bias" for a {token id: float} map, or "text" for a string. `openai`: whether the OpenAI
    endpoints take it under its own name (False where each endpoint declares it itself, its name or default
    differing).
    `sglang`: its name in /generate's sampling_params, "" for the same name, None where SGLang has none."""
    metadata = dict(wire=wire, range=range, openai=openai, sglang=sglang)
    if default in (list, dict):
        return field(default_factory=default, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class SamplingParams:
    """Same semantics as vLLM's SamplingParams for the fields they share.

    temperature 0 means greedy. top_k -1 (or 0) disables top-k; top_p 1.0 and min_p 0.0 disable theirs.
    seed None means the engine draws one at admission: every request samples from noise that is a pure
    function of (seed, output position), so a seeded request gives the same tokens whatever else runs.
    max_tokens None generates up to the context length. logprobs None returns no logprobs; an int n
    returns the chosen token's logprob and the top n; prompt_logprobs the same for every prompt token after the
    first (such a request computes its whole prompt: the prefix cache cannot give logits). grammar None leaves
    the output free; else an llguidance grammar (minisrv/structured_output.py makes one from a JSON schema, a
    regex, choices or GBNF/Lark) that every sampled token must follow; the request stops once the grammar is
    complete.
    """

    temperature: float = option(1.0, "d", Range(0.0))
    top_p: float = option(1.0, "d", Range(0.0, 1.0, low_open=True))
    top_k: int = option(-1, "i", Range(-1, 2**31 - 1))
    min_p: float = option(0.0, "d", Range(0.0, 1.0))
    repetition_penalty: float = option(1.0, "d", Range(0.0, 2.0, low_open=True))
    presence_penalty: float = option(0.0, "d", Range(-2.0, 2.0))
    frequency_penalty: float = option(0.0, "d", Range(-2.0, 2.0))
    seed: int | None = option(None, "Q", Range(0, 2**63 - 1))
    max_tokens: int | None = option(16, "I", Range(1, 2**32 - 1), openai=False, sglang="max_new_tokens")
    min_tokens: int = option(0, "I", Range(0, 2**32 - 1), sglang="min_new_tokens")
    stop_token_ids: list[int] = option(list, "ids")
    ignore_eos: bool = option(False, "?")
    logprobs: int | None = option(None, "B", Range(0, MAX_TOP_LOGPROBS), openai=False, sglang=None)
    prompt_logprobs: int | None = option(None, "B", Range(0, MAX_TOP_LOGPROBS), sglang=None)
    logit_bias: dict[int, float] = option(dict, "bias")   # added to the logits (OpenAI's range: [-100, 100])
    grammar: str | None = option(None, "text", openai=False, sglang=None)   # the APIs take their own fields

    def __post_init__(self) -> None:
        self.validate()

    @property
    def penalised(self) -> bool:
        """Whether repetition, presence or frequency penalties change the logits (they read the output so far)."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def validate(self) -> None:
        """Raise ValueError naming the first out-of-range field."""
        validate_fields(self)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}")
        for token, bias in self.logit_bias.items():
            if not (isinstance(token, int) and 0 <= token < 2**31):
                raise ValueError(f"logit_bias keys must be token ids (integers >= 0), got {token!r}")
            if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise ValueError(f"logit_bias values must be in [-{MAX_LOGIT_BIAS}, {MAX_LOGIT_BIAS}], got {bias} "
                                 f"for token {token}")


OPTIONS: tuple[dataclasses.Field, ...] = dataclasses.fields(SamplingParams)


def api_names(api: Api) -> dict[str, str]:
    """{the option's name in `api`: its SamplingParams field} for every option `api` takes as it is."""
    names = {}
    for f in OPTIONS:
        if api == "openai" and f.metadata["openai"]:
            names[f.name] = f.name
        elif api == "sglang" and f.metadata["sglang"] is not None:
            names[f.metadata["sglang"] or f.name] = f.name
    return names
