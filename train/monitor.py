"""Run monitoring: each step's scalars and the run's alerts, sent to TensorBoard event files and/or an offline
W&B run under the work folder.

Invariants:
- Monitoring only observes: nothing here changes what is trained, and the loop's deterministic step log
  (`history`) holds no timing or memory figure; throughput, MFU and memory go to the sinks only.
- Only the main process writes, and only into a work folder the caller keeps (no folder: no sink).
- A curve shows each step once, as trained: after a resume or a rollback every sink drops what it had
  logged past the restored step (TensorBoard: a session-start record, its `purge_step`), and a fresh run
  replaces the event files an earlier run left in its folder.
- An alert (loss spike, skipped non-finite step, rollback) is one warning log line, an entry of the run's
  `alerts`, and a text/alert record in every sink.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

from core.errors import ConfigError

log = logging.getLogger(__name__)

ReportTo = Literal["tensorboard", "wandb"]
TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"  # W&B creates <work>/wandb/offline-run-*/ itself
ALERT_EVENTS = frozenset({"loss_spike", "nonfinite_skip", "rollback"})


def is_alert(event: Mapping[str, Any]) -> bool:
    return event.get("event") in ALERT_EVENTS


def describe_alert(event: Mapping[str, Any]) -> str:
    """One human-readable line for an alert event."""
    kind, step = event["event"], event["step"]
    if kind == "loss_spike":
        return f"step {step}: loss spike {event['loss']:.4f} (z={event['zscore']:.1f} over the window)"
    if kind == "nonfinite_skip":
        return f"step {step}: non-finite loss or gradient, step skipped"
    if kind == "rollback":
        return (
            f"step {step}: rolled back to the step-{event['to_step']} checkpoint, "
            f"learning rate x{event['lr_scale']:.3g}"
        )
    return f"step {step}: {kind}"


class Sink(Protocol):
    """Where scalars and alerts go."""

    def scalars(self, step: int, values: Mapping[str, float]) -> None: ...

    def alert(self, step: int, title: str, text: str) -> None: ...

    def restart(self, step: int) -> None:
        """Forget everything logged at steps after `step` (the run went back to `step`)."""

    def close(self) -> None: ...


class TensorBoardSink:
    """Event files under `folder`, written by torch's `SummaryWriter`."""

    def __init__(self, folder: Path, *, resume_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        if resume_step is None:  # a fresh run: the folder is this run's (an --overwrite replaces the last)
            shutil.rmtree(folder, ignore_errors=True)
        else:
            _after_existing_event_files(folder)
        # every file opens with a session-start record (readers take the first one of a folder as the run's
        # start and each later one as a restart that drops the records after its step)
        purge = 0 if resume_step is None else resume_step + 1
        self.writer: Any = SummaryWriter(log_dir=str(folder), purge_step=purge)

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def alert(self, step: int, title: str, text: str) -> None:
        self.writer.add_text("alerts", f"**{title}** {text}", step)

    def restart(self, step: int) -> None:
        """A session-start record at step + 1: readers drop the records before it with a later step."""
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog

        self.writer.file_writer.add_event(
            Event(step=step + 1, session_log=SessionLog(status=SessionLog.START))
        )

    def close(self) -> None:
        self.writer.close()


def _after_existing_event_files(folder: Path) -> None:
    """Wait (under a second) until a new event file's name sorts after the folder's existing ones.

    Readers take a folder's event files in name order and names start with the creation second
    (`events.out.tfevents.<second>.<host>.<pid>.<counter>`); the counter is not zero-padded, so two files
    of the same second and process could sort the wrong way round (`...9` after `...10`)."""
    seconds = [int(p.name.split(".")[3]) for p in folder.glob("events.out.tfevents.*")]
    while seconds and int(time.time()) <= max(seconds):
        time.sleep(0.05)


class WandbSink:
    """An offline W&B run under `folder` (nothing leaves the machine; `wandb sync` uploads it later)."""

    def __init__(self, folder: Path, *, project: str, name: str, config: Mapping[str, Any]) -> None:
        import wandb

        self._wandb = wandb
        folder.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            mode="offline",
            dir=str(folder),
            project=project,
            name=name,
            config=dict(config),
            settings=wandb.Settings(silent=True, console="off"),
        )
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        self.run.log({"step": step, **values})

    def alert(self, step: int, title: str, text: str) -> None:
        self.run.alert(title=title, text=text, level="WARN")

    def restart(self, step: int) -> None:
        """W&B keeps every record; the x axis is the logged `step`, so repeated steps show as revisits."""

    def close(self) -> None:
        self.run.finish()
        # the run is on disk; stop W&B's background service too, so a finished run leaves no process
        self._wandb.teardown()


class Monitor:
    """Fans a run's scalars and alerts out to its sinks (none on non-main processes)."""

    def __init__(self, sinks: Sequence[Sink] = ()) -> None:
        self.sinks = list(sinks)

    @classmethod
    def open(
        cls,
        report_to: Sequence[ReportTo],
        work_dir: Path | None,
        *,
        explicit: bool,
        main_process: bool,
        resume_step: int | None,
        wandb_project: str,
        run_config: Mapping[str, Any],
    ) -> Monitor:
        """The sinks named in `report_to` under `work_dir`. A sink whose package is missing is an error when
        it was asked for (`explicit`), and a warning when it is only the default (so an environment without
        tensorboard, the toolchain's, still trains)."""
        if not main_process or work_dir is None:
            return cls()
        sinks: list[Sink] = []
        for name in dict.fromkeys(report_to):
            try:
                if name == "tensorboard":
                    sinks.append(TensorBoardSink(work_dir / TENSORBOARD_DIR, resume_step=resume_step))
                else:
                    sinks.append(
                        WandbSink(
                            work_dir / WANDB_DIR, project=wandb_project, name=work_dir.name, config=run_config
                        )
                    )
            except ImportError as err:
                message = f"report_to {name}: the {name} package is not installed here ({err})"
                if explicit:
                    raise ConfigError(message) from None
                log.warning("%s; training without it", message)
        return cls(sinks)

    def scalars(self, step: int, values: Mapping[str, float | None]) -> None:
        present = {k: float(v) for k, v in values.items() if v is not None}
        for sink in self.sinks:
            sink.scalars(step, present)

    def alert(self, event: Mapping[str, Any]) -> None:
        text = describe_alert(event)
        log.warning("alert: %s", text)
        self._send(event, text)

    def restart(self, step: int, kept_alerts: Sequence[Mapping[str, Any]] = ()) -> None:
        """The run went back to `step`: sinks drop later records, then get the alerts that still stand."""
        for sink in self.sinks:
            sink.restart(step)
        for event in kept_alerts:
            if event["step"] > step:
                self._send(event, describe_alert(event))

    def _send(self, event: Mapping[str, Any], text: str) -> None:
        for sink in self.sinks:
            sink.alert(int(event["step"]), str(event["event"]), text)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []
