"""`serve`'s command line: vLLM's own parser (engine + front end) plus the stack's settings; environment,
refusals, `--config`, and the one-line exit 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from core.errors import ConfigError
from serve import frontend
from serve.settings import STACK_GROUP, ServeSettings, build_parser, parse_keys_file, parse_settings

REPO = Path(__file__).resolve().parents[3]
GOOD_KEY = "a-real-looking-key-0123"


def test_defaults_are_vllms_except_the_documented_stack_defaults() -> None:
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    settings = parse_settings([])
    vllm = vars(make_arg_parser(FlexibleArgumentParser()).parse_args([]))
    ours = vars(settings.vllm)
    differing = {k for k in vllm if ours.get(k) != vllm[k]}
    # `model`: None means the embedded default model (vLLM's default names a hub model)
    assert differing == {"model", *frontend.STACK_DEFAULTS}
    assert settings.model is None and settings.api_keys == [] and not settings.lora_enabled()
    assert (settings.host, settings.port) == ("127.0.0.1", 8000)


def test_positional_model_as_vllm_serve_takes_it(tmp_path: Path) -> None:
    assert parse_settings([str(tmp_path)]).model == str(tmp_path)
    assert parse_settings(["--model", str(tmp_path)]).model == str(tmp_path)
    with pytest.raises(ConfigError, match="two models"):
        parse_settings([str(tmp_path), "--model", "/elsewhere"])


def test_flags_override_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMSTACK_PORT", "9001")
    monkeypatch.setenv("LLMSTACK_MAX_LORAS", "7")
    monkeypatch.setenv("LLMSTACK_ENFORCE_EAGER", "false")
    monkeypatch.setenv("LLMSTACK_MAX_QUEUED_REQUESTS", "3")  # a stack setting (pydantic-settings)
    settings = parse_settings(["--port", "9002", "--dtype", "float32"])
    assert settings.port == 9002 and settings.vllm.max_loras == 7 and settings.max_queued_requests == 3
    assert settings.vllm.dtype == "float32" and settings.vllm.enforce_eager is False
    assert settings.explicit("enforce_eager") and settings.explicit("max_loras")
    assert not settings.explicit("max_num_seqs")


def test_list_flags_accept_repeats_several_values_and_env_json(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = parse_settings(["--api-key", GOOD_KEY, GOOD_KEY + "b", "--lora-modules", "a=/x", "b=/y"])
    assert settings.api_keys == [GOOD_KEY, GOOD_KEY + "b"]
    admins = parse_settings(["--admin-api-key", GOOD_KEY, "--admin-api-key", GOOD_KEY + "c"]).admin_api_key
    assert [k.get_secret_value() for k in admins] == [GOOD_KEY, GOOD_KEY + "c"]  # the stack's flags extend
    assert list(settings.adapters()) == ["a", "b"] and settings.lora_enabled()
    monkeypatch.setenv("LLMSTACK_SERVED_MODEL_NAME", '["one", "two"]')
    assert parse_settings([]).served_model_names(Path("/m")) == ["one", "two"]


def test_config_file_as_vllm_reads_it(tmp_path: Path) -> None:
    config = tmp_path / "serve.yaml"
    config.write_text("max-num-seqs: 5\nenable-prefix-caching: true\nserved-model-name: [x, y]\n")
    settings = parse_settings(["--config", str(config), "--max-model-len", "256"])
    assert settings.vllm.max_num_seqs == 5 and settings.vllm.enable_prefix_caching is True
    assert settings.vllm.served_model_name == ["x", "y"] and settings.vllm.max_model_len == 256
    assert settings.explicit("max_num_seqs")


@pytest.mark.parametrize("key", ["changeme", "sk-xxx", "aaaaaaaaaaaa", "short"])
def test_placeholder_keys_are_refused(key: str) -> None:
    with pytest.raises(ConfigError, match=r"placeholder|repeats|shorter"):
        parse_settings(["--api-key", key])


def test_placeholder_in_keys_file_is_refused(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"ok:{GOOD_KEY}\nbad:changeme\n")
    with pytest.raises(ValidationError, match="'bad'"):
        ServeSettings(api_keys_file=keys)
    assert parse_keys_file(f"# c\n\n{GOOD_KEY}\nname: {GOOD_KEY} # trailing\n") == [
        (None, GOOD_KEY),
        ("name", GOOD_KEY),
    ]


@pytest.mark.parametrize(
    ("specs", "message"),
    [(["a=/x", "a=/y"], "given twice"), (["a b=/x"], "invalid adapter name")],
)
def test_lora_names_are_checked_like_the_registry_does(specs: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_settings(["--lora-modules", *specs]).adapter_specs()


def test_a_refused_option_names_itself_and_why() -> None:
    with pytest.raises(ConfigError) as refused:
        parse_settings(["--tool-server", "demo", "--api-server-count", "2"])
    message = str(refused.value)
    assert "--tool-server is not supported" in message and "--api-server-count is not supported" in message
    # values that ask for what this server does anyway are accepted
    parse_settings(["--api-server-count", "1", "--chat-template-content-format", "string"])


def test_every_front_end_option_of_vllm_is_classified() -> None:
    """A vLLM upgrade that adds a front-end option fails here until the option is honoured, found not to
    apply, or refused (serve/frontend.py): never silently ignored."""
    from vllm import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    vllm_parser = make_arg_parser(FlexibleArgumentParser())
    engine = set(AsyncEngineArgs.__dataclass_fields__)
    front = {a.dest for a in vllm_parser._actions if a.dest != "help"} - engine
    classified = frontend.front_end_dests()
    assert front - set(classified) == set(), "vLLM front-end options nobody decided on"
    assert set(classified) - front - engine == set(), "classified options vLLM no longer has"
    assert not set(frontend.HONOURED) & set(frontend.REFUSED) & set(frontend.NOT_APPLICABLE)


def test_serve_accepts_every_option_of_vllms_serve_parser() -> None:
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    vllm_options = {o for a in make_arg_parser(FlexibleArgumentParser())._actions for o in a.option_strings}
    ours = {o for a in build_parser()._actions for o in a.option_strings}
    assert vllm_options <= ours


def test_every_stack_setting_has_a_documented_flag_in_its_own_group() -> None:
    parser = build_parser()
    group = next(g for g in parser._action_groups if g.title == STACK_GROUP)
    flags = {o for a in group._group_actions for o in a.option_strings}
    for name, field in ServeSettings.model_fields.items():
        assert "--" + name.replace("_", "-") in flags
        assert field.description, f"{name} has no description"


def _errors(stderr: str) -> list[str]:
    """The CLI's own error lines (vLLM's import may log a platform warning before them)."""
    return [line for line in stderr.splitlines() if line.startswith("serve: error: ")]


def _serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "serve.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, **(env or {})},
    )


def test_cli_exits_2_with_every_problem_on_one_line() -> None:
    result = _serve("--api-key", "changeme", "--tool-server", "demo")
    assert result.returncode == 2
    assert len(_errors(result.stderr)) == 1, "every problem on one line"
    assert result.stderr.strip().splitlines()[-1].startswith("serve: error: "), result.stderr
    assert "placeholder" in result.stderr and "--tool-server" in result.stderr


def test_cli_unknown_flag_exits_2_with_one_line() -> None:
    result = _serve("--no-such-flag", "1")
    assert result.returncode == 2
    assert _errors(result.stderr) == [result.stderr.strip().splitlines()[-1]], result.stderr
    assert _errors(result.stderr)[0].startswith("serve: error: unrecognized arguments: --no-such-flag")


def test_cli_refuses_a_list_setting_that_is_not_json() -> None:
    result = _serve(env={"LLMSTACK_ADMIN_API_KEY": "a=/tmp/adapter"})
    assert result.returncode == 2
    assert _errors(result.stderr) == [result.stderr.strip().splitlines()[-1]], result.stderr
    assert "admin_api_key" in result.stderr and "JSON" in result.stderr


def test_cli_refuses_a_missing_model_folder(tmp_path: Path) -> None:
    result = _serve(str(tmp_path / "nope"))
    assert result.returncode == 2
    assert _errors(result.stderr) == [result.stderr.strip().splitlines()[-1]], result.stderr
    assert _errors(result.stderr)[0].startswith("serve: error: model path")


def test_help_groups_options_as_vllm_does() -> None:
    result = _serve("--help")
    assert result.returncode == 0
    for group in ("Frontend", "ModelConfig", "CacheConfig", STACK_GROUP):
        assert group in result.stdout
    stack = _serve(f"--help={STACK_GROUP}")
    assert "--drain-timeout-seconds" in stack.stdout and "--max-num-seqs" not in stack.stdout


def test_every_refused_option_is_listed_in_the_serving_docs() -> None:
    docs = (REPO / "docs" / "SERVING.md").read_text()
    missing = [d for d in frontend.REFUSED if f"`--{d.replace('_', '-')}`" not in docs]
    assert missing == []


def test_headless_flag_runs_the_headless_node(tiny_model_dir: Path) -> None:
    """`serve --headless` is `python -m serve.headless` (vLLM's `vllm serve --headless`): here it reaches the
    headless node's own check, which needs a local rank."""
    result = _serve(
        str(tiny_model_dir), "--headless", "--data-parallel-size", "2", "--data-parallel-size-local", "0"
    )
    assert result.returncode == 2, result.stderr
    assert _errors(result.stderr) == [
        "serve: error: a headless node runs at least one rank: set --data-parallel-size-local >= 1"
    ]
