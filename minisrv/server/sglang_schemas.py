"""The success bodies of SGLang's routes (/generate, /get_model_info, /get_server_info), for /openapi.json only.

As in response_schemas.py: models that describe the dicts sglang.py and app.py build, never in their way, checked
on real responses by tests/server/test_openapi.py. The settings /get_server_info reports, the scheduler's stats in
it and the sampling defaults /get_model_info reports are typed from the dataclasses that declare them, so a new
setting or stat needs no edit here.
"""
from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Iterable, Literal, get_type_hints

from pydantic import ConfigDict, Field, RootModel, create_model

from minisrv.config import EngineConfig, ServerConfig, reported_settings
from minisrv.models.source import GENERATION_DEFAULTS
from minisrv.sampling_params import SamplingParams
from minisrv.server.response_schemas import Body
from minisrv.wire.terms import FINISH_API_NAMES, SchedulerStats

EngineFinishReason = Literal[tuple(name for name in FINISH_API_NAMES if name is not None)]
# SGLang's (logprob, token id, token text): the text is null unless the request sets return_text_in_logprobs.
LogprobTriple = tuple[float, int, str | None]


def _fields_of(declared: type, names: Iterable[str], required: bool = True) -> dict[str, Any]:
    """The dataclass `declared`'s fields `names` as create_model takes them, typed as it declares them; not
    `required`: left out of a body unless set."""
    hints = get_type_hints(declared)
    return {name: (hints[name], ...) if required else (hints[name] | None, None) for name in names}


class FinishReason(Body):
    type: EngineFinishReason


class GenerateMetaInfo(Body):
    id: str                             # the request's rid, else one the server made
    finish_reason: FinishReason | None  # null until the choice ends (a stream's events)
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    # return_logprob: one triple per output token, and for each its top_logprobs_num alternatives
    output_token_logprobs: list[LogprobTriple] | None = None
    output_top_logprobs: list[list[LogprobTriple]] | None = None


class GenerateOutput(Body):
    text: str
    output_ids: list[int]
    meta_info: GenerateMetaInfo


class GenerateChunk(GenerateOutput):
    """One event of a stream: its choice's whole text, token ids and logprobs so far, as SGLang sends them."""

    index: int


class GenerateAnswer(RootModel[GenerateOutput | Annotated[list[GenerateOutput], Field(min_length=2)]]):
    """/generate's JSON answer: the output, or a list of one per choice when n > 1."""

    model_config = ConfigDict(strict=True)   # a root model has no keys of its own to forbid


PreferredSamplingParams = create_model(
    "PreferredSamplingParams", __base__=Body, __doc__="The defaults of the sampling options a request leaves out.",
    **_fields_of(SamplingParams, GENERATION_DEFAULTS, required=False))


class ModelInfo(Body):
    model_path: str       # --model as given
    tokenizer_path: str
    is_generation: bool
    preferred_sampling_params: PreferredSamplingParams | None   # null: none (the neutral values apply)
    weight_version: str


SchedulerState = create_model("SchedulerState", __base__=Body, __doc__=SchedulerStats.__doc__,
                              **_fields_of(SchedulerStats, (f.name for f in dataclasses.fields(SchedulerStats))))


class ServerInfoKeys(Body):
    """What /get_server_info reports besides the settings; served_model_name is the name responses report."""

    model_path: str
    context_length: int
    served_model_name: str
    version: str
    internal_states: list[SchedulerState]   # one: every replica's stats together


def _reported_settings() -> dict[str, Any]:
    """The settings app.py's server_info reports (each one with help that is not secret) but those it replaces."""
    return {name: spec for config in (EngineConfig, ServerConfig)
            for name, spec in _fields_of(config, reported_settings(config)).items()
            if name not in ServerInfoKeys.model_fields}


ServerInfo = create_model("ServerInfo", __base__=ServerInfoKeys, __doc__="The server's settings and state.",
                          **_reported_settings())
