"""Wire models shared by the generation endpoints (chat, completions): sampling fields, structured outputs,
stream options; and the one function that turns them into vLLM's `SamplingParams`.

Invariants: a field left unset by the request takes the model's `generation_config.json` default, then
OpenAI's (as vLLM's `--generation-config auto`); every combination vLLM would refuse, and every token id
outside the vocabulary, is a 400 naming the field, never a 500.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator
from vllm import SamplingParams
from vllm.exceptions import VLLMClientError
from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

from core.config import StrictModel
from serve.errors import OpenAIError
from serve.openai.fields import OpenAIRequest

MAX_N = 16
MAX_LOGPROBS = 20  # vLLM's default --max-logprobs

StopString = Annotated[str, Field(min_length=1)]
StopSequences = StopString | list[StopString]  # an empty stop string would end every generation at once

# OpenAI's defaults, used when neither the request nor the model's generation config sets a value.
OPENAI_DEFAULTS: dict[str, float | int] = {
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 0,
    "min_p": 0.0,
    "repetition_penalty": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
}


class _Nested(StrictModel):
    """Nested option objects are strict: a typo inside them is a 400, not a silently dropped option."""


class StreamOptions(_Nested):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class JsonSchemaFormat(_Nested):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Nested):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs a 'json_schema' object")
        return self


class StructuredOutputs(_Nested):
    """vLLM's `structured_outputs` extension: exactly one constraint."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = Field(None, min_length=1)
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None

    @model_validator(mode="after")
    def _one_constraint(self) -> StructuredOutputs:
        given = [n for n in ("json_", "regex", "choice", "grammar", "json_object") if getattr(self, n)]
        if len(given) != 1:
            raise ValueError("give exactly one of json, regex, choice, grammar, json_object")
        return self


def check_json_schema(schema: dict[str, Any] | str, param: str) -> dict[str, Any]:
    """`schema` (an object or its JSON text) if it is a valid JSON Schema; a 400 on `param` otherwise."""
    import jsonschema

    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as err:
            raise OpenAIError(400, f"the JSON schema is not valid JSON: {err}", param=param) from None
    if not isinstance(schema, dict):
        raise OpenAIError(400, "a JSON schema must be an object", param=param)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as err:
        raise OpenAIError(400, f"not a valid JSON Schema: {err.message}", param=param) from None
    return schema


def compact_json(schema: dict[str, Any]) -> StructuredOutputsParams:
    """A constraint to JSON valid under `schema` with no free whitespace (compact separators).

    vLLM 0.32 reads `disable_any_whitespace` only from its engine-wide config (and then refuses the `auto`
    backend), so the per-request form is built here: xgrammar, vLLM's own structured-output backend,
    turns the schema into its EBNF grammar, which vLLM compiles (and caches) like any grammar. Small models
    need this: with free whitespace they fill the answer with blanks until max_tokens (measured)."""
    import xgrammar

    grammar = xgrammar.Grammar.from_json_schema(
        json.dumps(schema), any_whitespace=False, separators=(",", ":")
    )
    # xgrammar 0.2.8 lets a length-bounded string (`maxLength`) hold raw control characters, which JSON
    # forbids (measured: a `json.loads` failure on "\x0b"); its unbounded strings exclude them. Same class.
    return StructuredOutputsParams(grammar=str(grammar).replace(_BOUNDED_STRING_CHARS, _JSON_STRING_CHARS))


_BOUNDED_STRING_CHARS = r"[^\"\\\r\n]"
_JSON_STRING_CHARS = r"[^\0-\x1f\"\\\r\n]"


class SamplingFields(OpenAIRequest):
    """The sampling fields chat and completions share (OpenAI's, plus vLLM's sampling extensions)."""

    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    stop: StopSequences | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    bad_words: list[StopString] | None = None
    allowed_token_ids: list[int] | None = Field(None, min_length=1)
    include_stop_str_in_output: bool = False
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    user: str | None = None
    priority: int = Field(0, description="accepted for vLLM compatibility; only 0 (no priority scheduling)")

    @model_validator(mode="after")
    def _shared_consistency(self) -> SamplingFields:
        if self.priority != 0:
            raise ValueError("priority scheduling is not enabled on this server: priority must be 0")
        constrains_format = self.response_format is not None and self.response_format.type != "text"
        if self.structured_outputs is not None and constrains_format:
            raise ValueError("give either response_format or structured_outputs, not both")
        return self

    def structured(self) -> StructuredOutputsParams | None:
        """The structured-output constraint of `response_format` / `structured_outputs`, if any."""
        if self.structured_outputs is not None:
            so = self.structured_outputs
            schema = check_json_schema(so.json_, "structured_outputs.json") if so.json_ is not None else None
            if so.disable_any_whitespace and (schema is not None or so.json_object):
                return compact_json(schema if schema is not None else {"type": "object"})
            return StructuredOutputsParams(
                json=schema,
                regex=so.regex,
                choice=so.choice,
                grammar=so.grammar,
                json_object=so.json_object,
                disable_additional_properties=so.disable_additional_properties,
                whitespace_pattern=so.whitespace_pattern,
            )
        fmt = self.response_format
        if fmt is None or fmt.type == "text":
            return None
        # Compact JSON, as OpenAI's JSON modes answer.
        if fmt.type == "json_object":
            return compact_json({"type": "object"})
        assert fmt.json_schema is not None
        return compact_json(check_json_schema(fmt.json_schema.schema_, "response_format.json_schema.schema"))

    def sampling_params(
        self,
        *,
        max_tokens: int,
        defaults: dict[str, Any],
        vocab_size: int,
        logprobs: int | None,
        prompt_logprobs: int | None = None,
        stream: bool,
        structured: StructuredOutputsParams | None = None,
        skip_special_tokens: bool | None = None,
    ) -> SamplingParams:
        """vLLM's sampling parameters for this request (`structured` overrides the request's own
        constraint, as tool calling does)."""
        values = {
            name: value if (value := getattr(self, name)) is not None else defaults.get(name, default)
            for name, default in OPENAI_DEFAULTS.items()
        }
        _check_token_ids(self.stop_token_ids, vocab_size, "stop_token_ids")
        _check_token_ids(self.allowed_token_ids, vocab_size, "allowed_token_ids")
        bias = None
        if self.logit_bias:
            try:
                bias = {int(token): value for token, value in self.logit_bias.items()}
            except ValueError:
                raise OpenAIError(400, "logit_bias keys must be token ids", param="logit_bias") from None
            _check_token_ids(list(bias), vocab_size, "logit_bias")
        return make_sampling_params(
            n=self.n,
            max_tokens=max_tokens,
            **values,
            seed=self.seed,
            stop=[self.stop] if isinstance(self.stop, str) else self.stop,
            stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            skip_special_tokens=self.skip_special_tokens
            if skip_special_tokens is None
            else skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            logit_bias=bias,
            allowed_token_ids=self.allowed_token_ids,
            bad_words=self.bad_words,
            structured_outputs=structured if structured is not None else self.structured(),
            output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY,
        )


def _check_token_ids(ids: list[int] | None, vocab_size: int, param: str) -> None:
    if ids and any(not 0 <= t < vocab_size for t in ids):
        raise OpenAIError(400, f"{param}: token ids must be in [0, {vocab_size})", param=param)


def make_sampling_params(**kwargs: Any) -> SamplingParams:
    """`SamplingParams(**kwargs)`; a combination vLLM refuses is the client's 400, never a 500."""
    try:
        return SamplingParams(**kwargs)
    except (ValueError, TypeError, VLLMClientError) as err:
        raise OpenAIError(400, f"invalid sampling parameters: {err}") from None
