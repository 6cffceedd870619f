"""What the timing benchmarks (scaling.py, decode_bench.py) write: the machine and load they ran
under, `STEM.{md,json,csv}` and a log-log plot of time per token against length
(`lexjax.evaluation.report.plot_curves`)."""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
from pathlib import Path
from typing import Sequence

import jax

from lexjax.evaluation.report import plot_curves


def run_meta(args: argparse.Namespace, load_before: Sequence[float]) -> dict:
    """The machine, the load average before and now, the date and the arguments."""
    return {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                       f"jax {jax.__version__} on {jax.devices()[0].platform}",
            "load_before": [round(x, 2) for x in load_before],
            "load_after": [round(x, 2) for x in os.getloadavg()],
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "argv": vars(args) | {"out": os.path.relpath(args.out)}}


def write_records(stem: Path, text: str, rows: list[dict], meta: dict) -> None:
    """`stem.md` (text), `stem.json` (meta and every row), `stem.csv` (the scalar columns)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{stem}.md").write_text(text)
    Path(f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    scalar = list(dict.fromkeys(k for row in rows for k, v in row.items()
                                if not isinstance(v, list)))
    with open(f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=scalar, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def plot_per_token(rows: list[dict], models: Sequence[str], path: Path, *, x: str, y: str,
                   xlabel: str, ylabel: str) -> None:
    """`row[y]` against `row[x]`, one line per model (`row["model"]`), log-log."""
    curves = {name: ([row[x] for row in rows if row["model"] == name],
                     [row[y] for row in rows if row["model"] == name]) for name in models}
    plot_curves(str(path), curves, train_length=None, ylabel=ylabel, xlabel=xlabel, log_y=True)
