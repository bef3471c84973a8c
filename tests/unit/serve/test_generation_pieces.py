"""Unit tests of the generation pipeline's pieces that need no engine: the compact-JSON constraint, the
`required` tool-call scanner, the field policy's upstream sets, and the fast tokenizer path."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from xgrammar import Grammar
from xgrammar.testing import _is_grammar_accept_string as accepts

from serve.openai.chat.tools import (
    MAX_PARALLEL_CALLS,
    RequiredCallScanner,
    ToolPlan,
    ToolStream,
    parse_final,
    split_required,
)
from serve.openai.fields import upstream_fields
from serve.openai.protocol import compact_json

SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 8}, "days": {"type": "integer"}},
    "required": ["city", "days"],
    "additionalProperties": False,
}


def _grammar(schema: dict) -> Grammar:  # type: ignore[type-arg]
    params = compact_json(schema)
    assert params.grammar is not None
    return Grammar.from_ebnf(params.grammar)


def test_compact_json_accepts_compact_valid_json_only() -> None:
    grammar = _grammar(SCHEMA)
    assert accepts(grammar, '{"city":"Paris","days":3}')
    assert not accepts(grammar, '{"city": "Paris", "days": 3}'), "no free whitespace"
    assert not accepts(grammar, '{"city":"Parisienne","days":3}'), "maxLength holds"
    assert not accepts(grammar, '{"city":"Pa\x0bris","days":3}'), "no raw control characters in strings"


def test_required_scanner_gives_each_calls_exact_arguments_in_any_split() -> None:
    text = (
        '[{"name":"get_weather","arguments":{"city":"Pa\\"ri}s","n":[1,{"a":2}]}},'
        '{"name":"b","arguments":{}}]'
    )
    expected = [("get_weather", '{"city":"Pa\\"ri}s","n":[1,{"a":2}]}'), ("b", "{}")]
    assert split_required(text) == expected
    rng = random.Random(0)
    for _ in range(50):
        scanner = RequiredCallScanner()
        cuts = sorted(rng.sample(range(1, len(text)), 8))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        grown: dict[int, str] = {}
        for piece in pieces:
            for index, fragment in scanner.feed(piece).items():
                grown[index] = grown.get(index, "") + fragment
        assert [(c.name, grown[i]) for i, c in enumerate(scanner.calls)] == expected
    json.loads(expected[0][1])


def test_named_and_required_plans_constrain_to_the_schemas() -> None:
    tools = ({"type": "function", "function": {"name": "get_weather", "parameters": SCHEMA}},)
    named = ToolPlan("named", tools, named="get_weather").constraint()
    assert named is not None and accepts(Grammar.from_ebnf(named.grammar or ""), '{"city":"Rome","days":2}')
    required = ToolPlan("required", tools, parallel=False).constraint()
    assert required is not None
    grammar = Grammar.from_ebnf(required.grammar or "")
    assert accepts(grammar, '[{"name":"get_weather","arguments":{"city":"Rome","days":2}}]')
    assert not accepts(grammar, '[{"name":"other","arguments":{"city":"Rome","days":2}}]')
    assert not accepts(grammar, "[]"), "at least one call"
    call = '{"name":"get_weather","arguments":{"city":"A","days":1}}'
    two = f"[{call},{call}]"
    assert not accepts(grammar, two), "parallel_tool_calls false: exactly one"
    parallel = ToolPlan("required", tools, parallel=True).constraint()
    assert parallel is not None
    grammar = Grammar.from_ebnf(parallel.grammar or "")
    assert accepts(grammar, two), "parallel calls are allowed"
    assert accepts(grammar, "[" + ",".join([call] * MAX_PARALLEL_CALLS) + "]")
    assert not accepts(grammar, "[" + ",".join([call] * (MAX_PARALLEL_CALLS + 1)) + "]"), "bounded"


CALL_A = '{"name":"get_weather","arguments":{"city":"Rome","days":2}}'
CALL_A_REORDERED = '{"name":"get_weather","arguments":{"days":2,"city":"Rome"}}'
CALL_B = '{"name":"get_weather","arguments":{"city":"Oslo","days":1}}'
CALL_T = '{"name":"final_result","arguments":{"city":"Rome","days":2}}'


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"[{CALL_A},{CALL_A},{CALL_A}]", [CALL_A]),
        (f"[{CALL_A},{CALL_B},{CALL_A_REORDERED},{CALL_T}]", [CALL_A, CALL_B, CALL_T]),
        (f"[{CALL_A},{CALL_A},{CALL_B[:30]}", [CALL_A]),  # cut inside a new call
        (f"[{CALL_A},{CALL_B},{CALL_A[:-1]}", [CALL_A, CALL_B]),  # cut just before a call closes
        (f"[{CALL_A[:-3]}", []),  # cut before the first call ends
        ("[", []),
    ],
)
def test_required_answers_are_their_complete_distinct_calls(text: str, expected: list[str]) -> None:
    want = [(json.loads(c)["name"], c[c.index('"arguments":') + 12 : -1]) for c in expected]
    assert split_required(text) == want
    plan = ToolPlan("required", ({"type": "function", "function": {"name": "get_weather"}},))
    final = parse_final(plan, text, None, truncated=not text.endswith("]"))  # type: ignore[arg-type]
    assert final.content is None, "a required answer is never text, cut or not"
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in final.tool_calls] == want
    # streamed in any split, the calls that go out are the same, whole, in the same order
    rng = random.Random(len(text))
    for _ in range(20):
        stream = ToolStream(plan, None)  # type: ignore[arg-type]
        cuts = sorted(rng.sample(range(1, len(text)), min(5, len(text) - 1)))
        deltas = []
        for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True):
            content, calls = stream.feed(text[a:b], ())
            assert content is None
            deltas.extend(calls)
        assert [d["index"] for d in deltas] == list(range(len(want)))
        assert [(d["function"]["name"], d["function"]["arguments"]) for d in deltas] == want
        assert all(d["id"].startswith("call_") and d["type"] == "function" for d in deltas)
        assert stream.called == bool(want)


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_upstream_fields_come_from_the_installed_packages(endpoint: str) -> None:
    fields = upstream_fields(endpoint)
    assert {"model", "temperature", "logit_bias"} <= fields
    assert ("use_beam_search" in fields) and ("suffix" in fields) == (endpoint == "completions")


def test_fast_encode_matches_the_tokenizer(tiny_model_dir: Path) -> None:
    from core.models import load_tokenizer
    from serve.state import ServerState

    tokenizer = load_tokenizer(tiny_model_dir)

    class _Engine:
        pass

    engine = _Engine()
    engine.tokenizer = tokenizer  # type: ignore[attr-defined]
    state = ServerState.__new__(ServerState)
    state.engine = engine  # type: ignore[assignment]
    for text in ["hello world", "<|im_start|>user\nDé jà vu 🙂<|im_end|>\n", "  spaced\ttabs\n\n", ""]:
        for special in (False, True):
            assert (
                state.encode(text, add_special_tokens=special)
                == tokenizer(text, add_special_tokens=special).input_ids
            )
