"""End to end: structured outputs and tool calling on the real engine, through the official `openai` client
and two real frameworks (langchain-openai, pydantic-ai), pinned in requirements/serve-cpu.lock.

The tiny model's weights are random, so its answers mean nothing; what is checked is that every answer that
is meant to follow a schema does, on real generated text, across seeds and temperatures. Schemas bound their
strings (`maxLength`) and numbers so that a random model finishes within max_tokens.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.e2e.serve_helpers import TIME, WEATHER
from tests.support.server import RunningServer, start_server

MODEL = "tiny-tools"
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather forecast", "parameters": WEATHER},
    },
    {"type": "function", "function": {"name": "get_time", "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK: list[Any] = [{"role": "user", "content": "What is the weather in Paris for 3 days?"}]


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with start_server(
        tiny_model_dir, "--served-model-name", MODEL, log_dir=tmp_path_factory.mktemp("serve-tools")
    ) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.openai_url, api_key="unused", max_retries=0, timeout=120)


def _valid_calls(calls: Any) -> list[tuple[str, dict[str, Any]]]:
    """(name, arguments) of OpenAI tool calls, each checked against its function's schema."""
    out = []
    for call in calls:
        arguments = json.loads(call.function.arguments)
        jsonschema.validate(arguments, SCHEMAS[call.function.name])
        out.append((call.function.name, arguments))
    return out


def _required_call(client: openai.OpenAI, *, seed: int, **sampling: Any) -> Any:
    """A chat turn that must call exactly one of TOOLS (`tool_choice=required`, no parallel calls)."""
    return client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=80,
        seed=seed,
        **sampling,
    )


# --- response_format and structured_outputs ------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.0, 0.8, 1.5])
def test_json_schema_answers_always_validate(client: openai.OpenAI, temperature: float) -> None:
    fmt: Any = {"type": "json_schema", "json_schema": {"name": "weather", "schema": WEATHER, "strict": True}}
    for seed in range(4):
        reply = client.chat.completions.create(
            model=MODEL, messages=ASK, max_tokens=64, temperature=temperature, seed=seed, response_format=fmt
        )
        assert reply.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(reply.choices[0].message.content or ""), WEATHER)


def test_json_object_answers_parse(client: openai.OpenAI) -> None:
    for seed in range(3):
        reply = client.chat.completions.create(
            model=MODEL,
            messages=ASK,
            max_tokens=200,
            temperature=0.7,
            seed=seed,
            response_format={"type": "json_object"},
        )
        if reply.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(reply.choices[0].message.content or ""), dict)


def test_structured_outputs_extension_on_chat_and_completions(server: RunningServer) -> None:
    cases: list[tuple[dict[str, Any], Any]] = [
        ({"choice": ["yes", "no", "maybe"]}, lambda t: t in ("yes", "no", "maybe")),
        ({"regex": r"[0-9]{3}-[a-z]{2}"}, lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2}", t)),
        ({"grammar": 'root ::= "red" | "green" | "blue"'}, lambda t: t in ("red", "green", "blue")),
        # vLLM's own `disable_any_whitespace`, honoured per request here (vLLM 0.32 reads it only engine-wide)
        (
            {"json": TIME, "disable_any_whitespace": True},
            lambda t: jsonschema.validate(json.loads(t), TIME) is None,
        ),
    ]
    for constraint, check in cases:
        chat = {"model": MODEL, "messages": ASK, "max_tokens": 40, "structured_outputs": constraint}
        reply = httpx.post(f"{server.openai_url}/chat/completions", json=chat, timeout=60).json()
        assert check(reply["choices"][0]["message"]["content"]), (constraint, reply)
        plain = {"model": MODEL, "prompt": "Answer:", "max_tokens": 40, "structured_outputs": constraint}
        reply = httpx.post(f"{server.openai_url}/completions", json=plain, timeout=60).json()
        assert check(reply["choices"][0]["text"]), (constraint, reply)


def test_bad_schemas_and_grammars_are_400_with_param(client: openai.OpenAI, server: RunningServer) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=MODEL,
            messages=ASK,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "nonsense"}},
            },
        )
    assert info.value.response.json()["error"]["param"] == "response_format.json_schema.schema"
    bad_tool = [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": 3}}}
    ]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=ASK, tools=bad_tool)
    assert info.value.response.json()["error"]["param"] == "tools.0.function.parameters"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=MODEL,
            messages=ASK,
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "nope"}},
        )
    assert info.value.response.json()["error"]["param"] == "tool_choice"
    body = {"model": MODEL, "prompt": "x", "max_tokens": 4, "structured_outputs": {"grammar": "root ::= ("}}
    assert httpx.post(f"{server.openai_url}/completions", json=body, timeout=60).status_code == 400


# --- tools ------------------------------------------------------------------------------------------------


def test_required_calls_validate_across_seeds(client: openai.OpenAI) -> None:
    for seed in range(4):
        reply = _required_call(client, seed=seed, temperature=1.0, logprobs=True)
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert len(_valid_calls(choice.message.tool_calls)) == 1
        assert choice.message.tool_calls[0].id.startswith("call_")
        assert len(choice.logprobs.content) == reply.usage.completion_tokens


def test_named_function_calls_validate(client: openai.OpenAI) -> None:
    for seed in range(3):
        reply = client.chat.completions.create(
            model=MODEL,
            messages=ASK,
            tools=TOOLS,
            max_tokens=60,
            temperature=1.2,
            seed=seed,
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
        )
        [(name, _)] = _valid_calls(reply.choices[0].message.tool_calls)
        assert name == "get_weather" and reply.choices[0].finish_reason == "tool_calls"


def test_tool_choice_none_answers_in_text(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=8
    )
    assert reply.choices[0].message.tool_calls is None and reply.choices[0].finish_reason == "length"


HERMES_CALL = (
    r'<tool_call>\n\{"name": "get_weather", "arguments": '
    r'\{"city": "[A-Z][a-z]{2,8}", "days": [1-9]\}\}\n</tool_call>'
)


def test_auto_calls_are_found_by_the_hermes_parser(client: openai.OpenAI) -> None:
    """`auto` leaves the model free; here vLLM's regex constraint makes the tiny model write a Hermes call,
    so the real parser reads real generated text."""
    reply = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=TOOLS,
        tool_choice="auto",
        max_tokens=150,
        seed=1,
        extra_body={"structured_outputs": {"regex": HERMES_CALL}},
    )
    choice = reply.choices[0]
    [(name, arguments)] = _valid_calls(choice.message.tool_calls)
    assert name == "get_weather" and arguments["days"] in range(1, 10)
    assert choice.finish_reason == "tool_calls"
    free = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=8, temperature=0)
    assert free.choices[0].message.tool_calls is None, "no call in plain text"


@pytest.mark.parametrize(
    ("tool_choice", "extra"),
    [
        ("required", {}),
        ({"type": "function", "function": {"name": "get_time"}}, {}),
        ("auto", {"structured_outputs": {"regex": HERMES_CALL}}),
    ],
)
def test_streamed_calls_accumulate_to_the_non_streamed_ones(
    client: openai.OpenAI, tool_choice: Any, extra: dict[str, Any]
) -> None:
    kwargs: dict[str, Any] = {
        "model": MODEL,
        "messages": ASK,
        "tools": TOOLS,
        "tool_choice": tool_choice,
        "parallel_tool_calls": False,
        "max_tokens": 150,
        "temperature": 1.0,
        "seed": 11,
        "extra_body": extra,
    }
    plain = client.chat.completions.create(**kwargs)
    with client.chat.completions.stream(**kwargs) as stream:
        fragments = sum(1 for event in stream if event.type == "tool_calls.function.arguments.delta")
        streamed = stream.get_final_completion()
    want = [(c.function.name, c.function.arguments) for c in plain.choices[0].message.tool_calls]
    if tool_choice == "required":
        assert fragments == len(want), "a required call goes out whole, once complete"
    else:
        assert fragments >= 2, "arguments arrive in fragments"
    got = [(c.function.name, c.function.arguments) for c in streamed.choices[0].message.tool_calls]
    if tool_choice == "auto":  # vLLM's hermes parser re-serialises the non-streamed arguments
        assert [(n, json.loads(a)) for n, a in got] == [(n, json.loads(a)) for n, a in want]
    else:
        assert got == want, "the exact same call text"
    assert streamed.choices[0].finish_reason == plain.choices[0].finish_reason == "tool_calls"
    _valid_calls(streamed.choices[0].message.tool_calls)


def test_a_tool_round_trip_conversation(client: openai.OpenAI) -> None:
    first = _required_call(client, seed=2)
    call = first.choices[0].message.tool_calls[0]
    history: list[Any] = [
        *ASK,
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"forecast": "sunny"})},
    ]
    second = client.chat.completions.create(
        model=MODEL, messages=history, tools=TOOLS, max_tokens=6, temperature=0
    )
    assert second.usage.prompt_tokens > first.usage.prompt_tokens
    assert second.choices[0].message.content


# --- real frameworks ----------------------------------------------------------------------------------


class Weather(BaseModel):
    """Weather forecast request."""

    city: str = Field(max_length=12)
    days: int = Field(ge=1, le=9)


def test_langchain_structured_output_and_bind_tools(server: RunningServer) -> None:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        base_url=server.openai_url, api_key="unused", model=MODEL, max_tokens=80, temperature=0.7, seed=3
    )
    for method in ("json_schema", "function_calling"):
        result = llm.with_structured_output(Weather, method=method).invoke("Weather in Paris for 3 days?")
        assert isinstance(result, Weather), method
    message = llm.bind_tools([Weather], tool_choice="Weather").invoke("Weather in Paris?")
    [call] = message.tool_calls
    assert call["name"] == "Weather"
    Weather.model_validate(call["args"])


def test_pydantic_ai_agent_with_structured_output(server: RunningServer) -> None:
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIChatModel, OpenAIChatModelSettings
    from pydantic_ai.providers.openai import OpenAIProvider

    model = OpenAIChatModel(MODEL, provider=OpenAIProvider(base_url=server.openai_url, api_key="unused"))
    settings = OpenAIChatModelSettings(max_tokens=80, temperature=0.7, seed=5, parallel_tool_calls=False)
    agent = Agent(model, output_type=Weather, model_settings=settings)
    result = agent.run_sync("What is the weather in Paris for 3 days?")
    assert isinstance(result.output, Weather)


# --- forced calls on the default model (issue 30, item 6) ---------------------------------------------
# A real small model under `tool_choice: required` writes the same complete call again and again: the
# grammar bounds the array, the server drops repeats, and a cut answer still carries its complete calls.

DEFAULT = "SmolLM2-135M-Instruct"


class Forecast(BaseModel):
    """A weather forecast."""

    city: str = Field(max_length=20)
    days: int = Field(ge=1, le=9)


def get_forecast(city: str) -> str:
    """The weather forecast of a city."""
    return f"Sunny in {city}."


def _agent_tools() -> list[Any]:
    """What pydantic-ai's default agent sends: a function tool and its output tool."""
    from pydantic_ai import Agent
    from pydantic_ai.models.test import TestModel

    model = TestModel()
    Agent(model, output_type=Forecast, tools=[get_forecast]).run_sync("x")
    params = model.last_model_request_parameters
    assert params is not None
    return [
        {
            "type": "function",
            "function": {
                "name": t.name,
                "description": t.description or "",
                "parameters": t.parameters_json_schema,
            },
        }
        for t in [*params.function_tools, *params.output_tools]
    ]


@pytest.fixture(scope="module")
def default_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    from core.default_model import ensure_default_model

    # the default model's own settings (serve without --model: float32 on CPU, see serve/cli.py)
    with start_server(
        ensure_default_model(), "--dtype", "float32", log_dir=tmp_path_factory.mktemp("serve-default")
    ) as running:
        yield running


def _distinct(calls: list[tuple[str, str]]) -> bool:
    keys = [(name, json.dumps(json.loads(arguments), sort_keys=True)) for name, arguments in calls]
    return len(set(keys)) == len(keys)


@pytest.mark.parametrize(
    ("seed", "parallel"),
    [
        (0, None),  # before the fix: 4 complete calls then cut: no tool_calls, the cut array as content
        (2, None),  # before the fix: the same call twice
        (0, False),
    ],
)
def test_forced_calls_end_on_chat_completions(
    default_server: RunningServer, seed: int, parallel: bool | None
) -> None:
    """The issue's request (pydantic-ai's tools, `required`, 128 tokens): distinct, complete calls come back,
    streamed or not, the same; one call without parallel calls."""
    client = openai.OpenAI(base_url=default_server.openai_url, api_key="unused", max_retries=0, timeout=300)
    tools = _agent_tools()
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    kwargs: dict[str, Any] = {
        "model": DEFAULT,
        "messages": [{"role": "user", "content": "What is the weather in Paris for 3 days?"}],
        "tools": tools,
        "tool_choice": "required",
        "max_tokens": 128,
        "seed": seed,
    }
    if parallel is not None:
        kwargs["parallel_tool_calls"] = parallel
    plain = client.chat.completions.create(**kwargs)
    choice = plain.choices[0]
    calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or []]
    assert calls, choice
    assert choice.message.content is None
    assert choice.finish_reason == ("length" if plain.usage.completion_tokens == 128 else "tool_calls")
    assert _distinct(calls)
    for name, arguments in calls:
        jsonschema.validate(json.loads(arguments), schemas[name])
    if parallel is False:
        assert len(calls) == 1
    # accumulated by hand: the client's stream helper refuses a "length" answer (LengthFinishReasonError)
    heads: dict[int, list[str]] = {}
    finish = None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for delta in chunk.choices[0].delta.tool_calls or []:
            head = heads.setdefault(delta.index, ["", ""])
            assert delta.function is not None
            head[0] += delta.function.name or ""
            head[1] += delta.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    got = [(name, arguments) for _, (name, arguments) in sorted(heads.items())]
    assert got == calls, "the stream ends with the non-streamed answer's calls"
    assert finish == choice.finish_reason


def test_forced_calls_end_on_anthropic_messages(default_server: RunningServer) -> None:
    import anthropic

    client = anthropic.Anthropic(base_url=default_server.url, api_key="unused", max_retries=0, timeout=300)
    tools: list[Any] = [
        {
            "name": t["function"]["name"],
            "description": t["function"]["description"],
            "input_schema": t["function"]["parameters"],
        }
        for t in _agent_tools()
    ]
    ask: list[Any] = [{"role": "user", "content": "What is the weather in Paris for 3 days?"}]
    for choice in ({"type": "any"}, {"type": "any", "disable_parallel_tool_use": True}):
        # greedy, so that the streamed answer is the same answer (the Messages API has no seed)
        kwargs: dict[str, Any] = {
            "model": DEFAULT,
            "max_tokens": 128,
            "messages": ask,
            "tools": tools,
            "extra_body": {"temperature": 0.0},  # this anthropic SDK version has no `temperature` argument
        }
        message = client.messages.create(tool_choice=choice, **kwargs)  # type: ignore[arg-type]
        uses = [(b.name, json.dumps(b.input)) for b in message.content if b.type == "tool_use"]
        assert uses and len(uses) == len(message.content), message
        assert message.stop_reason in ("tool_use", "max_tokens") and _distinct(uses)
        if choice.get("disable_parallel_tool_use"):
            assert len(uses) == 1
        with client.messages.stream(tool_choice=choice, **kwargs) as stream:  # type: ignore[arg-type]
            streamed = stream.get_final_message()
        assert [(b.name, b.input) for b in streamed.content] == [(n, json.loads(i)) for n, i in uses]
        assert streamed.stop_reason == message.stop_reason


def test_pydantic_ai_default_agent_on_the_default_model(default_server: RunningServer) -> None:
    """pydantic-ai's default agent (an output type and a function tool, default settings) gets its output,
    with no retry. (With `max_tokens=128` this model keeps calling `get_forecast` turn after turn: the
    model's choice, not the server's; the 128-token request itself is the chat test above.)"""
    from pydantic_ai import Agent
    from pydantic_ai.messages import ModelRequest, RetryPromptPart
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    provider = OpenAIProvider(base_url=default_server.openai_url, api_key="unused")
    agent = Agent(OpenAIChatModel(DEFAULT, provider=provider), output_type=Forecast, tools=[get_forecast])
    result = agent.run_sync("What is the weather in Paris for 3 days?")
    assert isinstance(result.output, Forecast)
    retries = [
        part
        for message in result.all_messages()
        if isinstance(message, ModelRequest)
        for part in message.parts
        if isinstance(part, RetryPromptPart)
    ]
    assert not retries, retries
