"""Run monitoring on the tiny model: what the loop sends to TensorBoard (read back with tensorboard's own
event reader) and to an offline W&B run (read back from its run file), the alerts, and what happens when a
sink's package is missing."""

from __future__ import annotations

import json
import logging
import math
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from core.errors import ConfigError
from train.config import LoopConfig, OptimConfig
from train.loop import causal_lm_loss_sum, train
from train.monitor import TENSORBOARD_DIR, WANDB_DIR

N_PARAMS = 819_840  # the tiny model's parameters


def loop_config(**overrides: Any) -> LoopConfig:
    base = {"max_steps": 6, "batch_size": 2, "eval_every": 0, "checkpoint_every": 0, "progress": False}
    return LoopConfig.model_validate({**base, **overrides})


def tensorboard_events(folder: Path) -> tuple[dict[str, list[tuple[int, float]]], list[tuple[int, str]]]:
    """(scalars by tag as (step, value), alert texts as (step, text)) of an event-file folder, read by the
    accumulator TensorBoard's own server uses (so orphaned records of a restarted run are purged as the
    UI purges them)."""
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    reader = EventAccumulator(str(folder), size_guidance={"tensors": 0})
    reader.Reload()
    scalars, alerts = {}, []
    for tag in reader.Tags()["tensors"]:
        values = [(e.step, tensor_util.make_ndarray(e.tensor_proto)) for e in reader.Tensors(tag)]
        if tag == "alerts/text_summary":
            alerts = [(step, value.item().decode()) for step, value in values]
        else:
            scalars[tag] = [(step, float(value)) for step, value in values]
    return scalars, alerts


def wandb_records(work_dir: Path) -> Iterator[Any]:
    """The protobuf records of the offline W&B run under `work_dir` (its `.wandb` file is a LevelDB-style
    log: a 7-byte header, then 32 KiB blocks of records, each with a 7-byte header: crc32, length, type
    1 full / 2 first / 3 middle / 4 last)."""
    from wandb.proto import wandb_internal_pb2

    (path,) = (work_dir / WANDB_DIR).glob("wandb/offline-run-*/run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, block, pending = 7, 32768, b""
    while position + 7 <= len(data):
        left = block - position % block
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if left < 7 or (length == 0 and kind == 0):  # block padding
            position += left
            continue
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def test_tensorboard_holds_every_step_and_eval(make_task, tmp_path: Path) -> None:
    config = loop_config(max_steps=4, eval_every=2, peak_tflops=1.0)
    result = train(make_task(flops_per_token=6.0 * N_PARAMS), config, tmp_path)
    scalars, alerts = tensorboard_events(tmp_path / TENSORBOARD_DIR)
    for tag, key in (("train/loss", "loss"), ("train/lr", "lr"), ("train/grad_norm", "grad_norm")):
        assert [s for s, _ in scalars[tag]] == [1, 2, 3, 4]
        assert [v for _, v in scalars[tag]] == pytest.approx([r[key] for r in result.history], rel=1e-6)
    assert scalars["eval/loss"] == [(e["step"], pytest.approx(e["eval_loss"])) for e in result.evals]
    assert [s for s, _ in scalars["eval/loss"]] == [0, 2, 4]
    throughput = [v for _, v in scalars["perf/tokens_per_s"]]
    assert len(throughput) == 4 and all(v > 0 for v in throughput)
    # MFU = tokens/s x FLOPs per token / peak FLOP/s (1 TFLOP/s configured)
    for (_, mfu), tokens_per_s in zip(scalars["perf/mfu"], throughput, strict=True):
        assert mfu == pytest.approx(tokens_per_s * 6.0 * N_PARAMS / 1e12, rel=1e-5)
    assert all(v > 50 for _, v in scalars["perf/memory_mb"])  # resident set size of this process
    peaks = [v for _, v in scalars["perf/peak_memory_mb"]]
    assert all(peak >= now for peak, (_, now) in zip(peaks, scalars["perf/memory_mb"], strict=True))
    assert alerts == [] and result.alerts == []


def test_no_mfu_without_a_known_peak(make_task, tmp_path: Path) -> None:
    train(make_task(flops_per_token=6.0 * N_PARAMS), loop_config(max_steps=2), tmp_path)
    scalars, _ = tensorboard_events(tmp_path / TENSORBOARD_DIR)
    assert "perf/mfu" not in scalars and len(scalars["perf/tokens_per_s"]) == 2


def test_nan_rollback_alerts_reach_log_summary_and_tensorboard(
    make_task, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Two skipped non-finite steps then a rollback: three kinds of record (log lines, the JSON summary's
    `alerts`, TensorBoard text), and TensorBoard's curve shows each step once, with the values kept."""
    calls = {"n": 0}

    def flaky(model, batch):
        calls["n"] += 1
        loss, tokens = causal_lm_loss_sum(model, batch)
        return (loss * float("nan") if 6 <= calls["n"] <= 8 else loss), tokens

    config = loop_config(max_steps=8, checkpoint_every=2, optim=OptimConfig(lr=1e-3))
    with caplog.at_level(logging.WARNING, logger="train.monitor"):
        result = train(make_task(flaky, eval_loss_fn=causal_lm_loss_sum), config, tmp_path)
    kinds = [a["event"] for a in result.alerts]
    assert kinds == ["nonfinite_skip", "nonfinite_skip", "nonfinite_skip", "rollback"]
    summary = json.loads((tmp_path / "train_log.json").read_text())
    assert summary["alerts"] == result.alerts
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("alert: ")]
    assert len(lines) == 4 and "rolled back to the step-4 checkpoint" in lines[-1]
    scalars, alerts = tensorboard_events(tmp_path / TENSORBOARD_DIR)
    assert [step for step, _ in scalars["train/loss"]] == list(range(1, 9))  # steps 5-6 once, not twice
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([r["loss"] for r in result.history])
    assert sorted(step for step, _ in alerts) == sorted(a["step"] for a in result.alerts)
    assert sum("rollback" in text for _, text in alerts) == 1


def test_resumed_run_shows_each_step_once(make_task, tmp_path: Path) -> None:
    """Killed in step 8 after its step-6 checkpoint: step 7 was logged, then logged again by the resumed
    run; TensorBoard shows it once."""
    config = loop_config(max_steps=8, checkpoint_every=3)
    calls = {"n": 0}

    def crashing(model, batch):
        calls["n"] += 1
        if calls["n"] == 12:  # 4 calls of initial eval, then steps 1-7; crash in step 8
            raise KeyboardInterrupt
        return causal_lm_loss_sum(model, batch)

    with pytest.raises(KeyboardInterrupt):
        train(make_task(crashing), config, tmp_path)
    before, _ = tensorboard_events(tmp_path / TENSORBOARD_DIR)
    assert [s for s, _ in before["train/loss"]] == [1, 2, 3, 4, 5, 6, 7]
    resumed = train(make_task(), config, tmp_path, resume=True)  # from the step-6 checkpoint
    scalars, _ = tensorboard_events(tmp_path / TENSORBOARD_DIR)
    assert [s for s, _ in scalars["train/loss"]] == list(range(1, 9))
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([r["loss"] for r in resumed.history])


def test_fresh_run_hides_an_earlier_runs_events(make_task, tmp_path: Path) -> None:
    train(make_task(), loop_config(max_steps=6), tmp_path)
    (tmp_path / "checkpoints").rename(tmp_path / "old-checkpoints")  # what --overwrite removes
    # the same second and process: event file names would sort by a counter that is not zero-padded
    again = train(make_task(), loop_config(max_steps=3), tmp_path)
    scalars, _ = tensorboard_events(tmp_path / TENSORBOARD_DIR)
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([r["loss"] for r in again.history])


def test_wandb_offline_run_records_scalars_and_a_spike_alert(make_task, tmp_path: Path) -> None:
    calls = {"n": 0}

    def spiky(model, batch):
        calls["n"] += 1
        loss, tokens = causal_lm_loss_sum(model, batch)
        return (loss * 10 if calls["n"] == 8 else loss), tokens  # call n is step n (own eval loss)

    config = loop_config(max_steps=10, spike_window=8, report_to=["wandb"])
    result = train(make_task(spiky, eval_loss_fn=causal_lm_loss_sum), config, tmp_path)
    assert [a["event"] for a in result.alerts] == ["loss_spike"] and result.alerts[0]["step"] == 8
    assert not (tmp_path / TENSORBOARD_DIR).exists()  # only the sink asked for
    rows, alerts, run_config = [], [], {}
    for record in wandb_records(tmp_path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {
                item.key or "/".join(item.nested_key): json.loads(item.value_json)
                for item in record.history.item
            }
            if "train/loss" in row:
                rows.append(row)
        elif kind == "alert":
            alerts.append((record.alert.title, record.alert.text, record.alert.level))
        elif kind == "run":
            run_config = {item.key: json.loads(item.value_json) for item in record.run.config.update}
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert [r["train/loss"] for r in rows] == pytest.approx([r["loss"] for r in result.history])
    assert all(r["perf/tokens_per_s"] > 0 and math.isfinite(r["train/grad_norm"]) for r in rows)
    assert len(alerts) == 1 and alerts[0][0] == "loss_spike" and "step 8" in alerts[0][1]
    assert alerts[0][2] == "WARN"
    assert run_config["max_steps"] == 10 and run_config["report_to"] == ["wandb"]


def test_missing_tensorboard_is_an_error_only_when_asked_for(
    make_task, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The toolchain environment has no tensorboard: the default sink is skipped with a warning there, an
    explicit `report_to: [tensorboard]` is refused before training."""
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    with caplog.at_level(logging.WARNING, logger="train.monitor"):
        result = train(make_task(), loop_config(max_steps=1), tmp_path / "default")
    assert result.steps == 1 and not (tmp_path / "default" / TENSORBOARD_DIR).exists()
    assert any("report_to tensorboard" in r.getMessage() for r in caplog.records)
    with pytest.raises(ConfigError, match="report_to tensorboard"):
        train(make_task(), loop_config(max_steps=1, report_to=["tensorboard"]), tmp_path / "explicit")


def test_recipe_refuses_an_unknown_sink() -> None:
    with pytest.raises(ValueError, match="report_to"):
        loop_config(report_to=["mlflow"])
