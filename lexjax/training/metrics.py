"""Where a run reports: `model_dir/metrics.jsonl` (one JSON object per logged step), TensorBoard
event files (`model_dir/tensorboard/`), and a console progress bar (step, loss, tokens/s, ETA)."""
from __future__ import annotations

import json
import math
import os
import sys
from typing import Optional

import tqdm
from tensorboardX import SummaryWriter

METRICS_FILE = "metrics.jsonl"


def read_metrics(model_dir: str) -> list[dict]:
    path = os.path.join(model_dir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_metrics(model_dir: str, last_step: int) -> None:
    """Drops records after `last_step` (logged after the checkpoint a resumed run restarts from),
    so the file reads as one uninterrupted curve."""
    path = os.path.join(model_dir, METRICS_FILE)
    if not os.path.exists(path):
        return
    kept = [r for r in read_metrics(model_dir) if r.get("step", 0) <= last_step]
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
    os.replace(path + ".tmp", path)


class MetricsLogger:
    """Writes each logged step to JSONL, TensorBoard and the progress bar."""

    def __init__(self, model_dir: str, *, total_steps: int, start_step: int,
                 progress: Optional[bool] = None):
        os.makedirs(model_dir, exist_ok=True)
        self._jsonl = open(os.path.join(model_dir, METRICS_FILE), "a")
        self._tensorboard = SummaryWriter(os.path.join(model_dir, "tensorboard"))
        show = sys.stderr.isatty() if progress is None else progress
        self._bar = tqdm.tqdm(total=total_steps, initial=start_step, unit="step",
                              dynamic_ncols=True, disable=not show)
        self._step = start_step

    def write(self, step: int, metrics: dict) -> None:
        record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for name, value in record.items():
            if name != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                self._tensorboard.add_scalar(name, value, step)
        self._bar.update(step - self._step)
        self._step = step
        shown = {k: f"{record[k]:.4g}" for k in ("loss", "tokens_per_sec", "mfu") if k in record}
        self._bar.set_postfix(shown, refresh=False)

    def text(self, name: str, text: str, step: int = 0) -> None:
        self._tensorboard.add_text(name, text, step)

    def message(self, text: str) -> None:
        self._bar.write(text)

    def close(self) -> None:
        self._bar.close()
        self._tensorboard.close()
        self._jsonl.close()


def _plain(value):
    if hasattr(value, "item"):
        value = value.item()
    return float(value) if isinstance(value, float) else value
