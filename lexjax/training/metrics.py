"""Where a run reports: `model_dir/metrics.jsonl` (one JSON object per logged step), TensorBoard
event files (`model_dir/tensorboard/`), and the console: a progress bar (step, loss, tokens/s,
ETA) on a terminal, else one plain line per logged step on stderr (how jobs run under nohup or on
a pod), and a closing summary either way.

`model_dir` may be a URI (`gs://bucket/run`): every file goes through `etils.epath`, TensorBoard's
event files too (`tensorboard_writer`)."""
from __future__ import annotations

import json
import math
import sys
import time
from typing import IO, Optional

import tqdm
from etils import epath
from tensorboardX import SummaryWriter, record_writer

from lexjax.paths import is_remote, run_path, write_text_atomic

METRICS_FILE = "metrics.jsonl"


def read_metrics(model_dir: str) -> list[dict]:
    """The records of `metrics.jsonl`; a line that is not JSON (torn by a crash mid-write) is
    skipped."""
    path = run_path(model_dir) / METRICS_FILE
    if not path.exists():
        return []
    records = []
    with path.open() as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return [r for r in records if isinstance(r, dict)]


def truncate_metrics(model_dir: str, last_step: int) -> None:
    """Drops records after `last_step` (logged after the checkpoint a resumed run restarts from),
    so the file reads as one uninterrupted curve."""
    path = run_path(model_dir) / METRICS_FILE
    if not path.exists():
        return
    kept = [r for r in read_metrics(model_dir) if r.get("step", 0) <= last_step]
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))


class _EpathEventFiles:
    """A tensorboardX writer factory that writes event files through `etils.epath`, where the
    run's other files go (tensorboardX's own `gs://` writer needs `google-cloud-storage`, and it
    has none for `az://`)."""

    def open(self, path: str) -> IO[bytes]:
        return epath.Path(path).open("wb")

    def directory_check(self, path: str) -> None:
        epath.Path(path).mkdir(parents=True, exist_ok=True)


def tensorboard_writer(directory: str) -> SummaryWriter:
    """A `SummaryWriter` into `directory`, a local path or a URI (whose scheme's event files
    tensorboardX then writes through epath, for this process)."""
    if is_remote(directory):
        scheme = directory.split("://", 1)[0]
        record_writer.register_writer_factory(scheme, _EpathEventFiles())
    return SummaryWriter(directory)


class MetricsLogger:
    """Writes each logged step to JSONL, TensorBoard and the progress bar. `enabled=False` (the
    processes other than 0 of a multi-host run) writes and shows nothing."""

    def __init__(self, model_dir: str, *, total_steps: int, start_step: int,
                 progress: Optional[bool] = None, enabled: bool = True):
        self._enabled = enabled
        if enabled:
            directory = run_path(model_dir)
            directory.mkdir(parents=True, exist_ok=True)
            self._jsonl = (directory / METRICS_FILE).open("a")
            self._tensorboard = tensorboard_writer(str(directory / "tensorboard"))
        show = enabled and (sys.stderr.isatty() if progress is None else progress)
        self._bar = tqdm.tqdm(total=total_steps, initial=start_step, unit="step",
                              dynamic_ncols=True, disable=not show)
        self._lines = enabled and not show  # plain progress lines instead of the bar
        self._total, self._start_step, self._step = total_steps, start_step, start_step
        self._started = time.perf_counter()
        self._last: dict = {}

    def write(self, step: int, metrics: dict) -> None:
        record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        if self._enabled:
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()
            for name, value in record.items():
                if name != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tensorboard.add_scalar(name, value, step)
        self._bar.update(step - self._step)
        self._step = step
        self._last.update(record)
        shown = {k: f"{record[k]:.4g}" for k in ("loss", "tokens_per_sec", "mfu") if k in record}
        self._bar.set_postfix(shown, refresh=False)
        if self._lines:
            self.message(progress_line(record, self._total, self._eta()))

    def _eta(self) -> Optional[float]:
        done = self._step - self._start_step
        if done <= 0:
            return None
        return (time.perf_counter() - self._started) / done * (self._total - self._step)

    def summary(self, ending: str = "") -> str:
        """One line on what this (re)start did: steps, time, last losses (and `ending`)."""
        seconds = time.perf_counter() - self._started
        parts = [f"trained steps {self._start_step + 1}-{self._step} of {self._total} in "
                 f"{format_seconds(seconds)}" if self._step > self._start_step
                 else f"no steps trained (at step {self._step} of {self._total})"]
        for key, label in (("loss", "loss"), ("validation_loss", "validation loss")):
            if key in self._last:
                parts.append(f"{label} {self._last[key]:.4f}")
        return "; ".join(parts) + (f"; {ending}" if ending else "")

    def text(self, name: str, text: str, step: int = 0) -> None:
        if self._enabled:
            self._tensorboard.add_text(name, text, step)

    def message(self, text: str) -> None:
        """A line on stderr (above the bar, if one is shown)."""
        if self._enabled:
            self._bar.write(text, file=sys.stderr)

    def close(self) -> None:
        self._bar.close()
        if self._enabled:
            self._tensorboard.close()
            self._jsonl.close()


def format_seconds(seconds: float) -> str:
    """`75.2` -> "1m15s"; `4000` -> "1h06m"."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


#: The objectives' accuracies (`lexjax.objectives`), shown in progress lines when logged.
ACCURACIES = ("masked_accuracy", "accuracy", "validation_masked_accuracy",
              "validation_accuracy")


def progress_line(record: dict, total: int, eta: Optional[float]) -> str:
    """`step 20/600: loss 2.3451, 5,120 tokens/s, MFU 50.1%, ETA 3m20s` (what is known)."""
    parts = []
    if "loss" in record:
        parts.append(f"loss {record['loss']:.4f}")
    if "validation_loss" in record:
        parts.append(f"validation loss {record['validation_loss']:.4f}")
    for name in ACCURACIES:
        if name in record:
            parts.append(f"{name.replace('_', ' ')} {100 * record[name]:.1f}%")
    if "tokens_per_sec" in record:
        parts.append(f"{record['tokens_per_sec']:,.0f} tokens/s")
    if "mfu" in record:
        parts.append(f"MFU {100 * record['mfu']:.1f}%")
    if eta is not None:
        parts.append(f"ETA {format_seconds(eta)}")
    return f"step {record['step']}/{total}: " + ", ".join(parts)


def _plain(value):
    if hasattr(value, "item"):
        value = value.item()
    return float(value) if isinstance(value, float) else value
