"""The bench's outputs: `DIR/bench.{json,csv,md,png}` (one row per mesh) and the printed table.
DIR (`--out`) may be a URI (`gs://bucket/bench`): the files are written through `etils.epath`."""
from __future__ import annotations

import json
import os
from typing import Sequence

from lexjax.evaluation.report import csv_text, markdown_table, save_figure
from lexjax.paths import run_path

MEASURED_COLUMNS = ("mesh", "mesh_shape", "devices", "compile_seconds", "step_seconds",
                    "tokens_per_sec", "mfu", "loss", "state_bytes_per_device",
                    "param_bytes_per_device", "temp_bytes")
ESTIMATED_COLUMNS = ("mesh", "mesh_shape", "chips", "fits_hbm", "hbm_note", "compile_seconds",
                     "state_bytes_per_device", "temp_bytes", "flops_per_chip",
                     "bytes_accessed_per_chip", "est_step_seconds", "est_tokens_per_sec",
                     "est_mfu", "est_source", "while_loops", "kernels")


def columns_of(rows: Sequence[dict]) -> tuple[str, ...]:
    return ESTIMATED_COLUMNS if any("topology" in r for r in rows) else MEASURED_COLUMNS


def _with_mib(rows: Sequence[dict]) -> list[dict]:
    """Byte counts shown in MiB in the Markdown table (the JSON and CSV keep bytes)."""
    out = []
    for row in rows:
        shown = dict(row)
        for key, value in row.items():
            if key.endswith("bytes_per_device") or key in ("temp_bytes",):
                shown[key] = None if value is None else f"{value / 2 ** 20:.2f} MiB"
        out.append(shown)
    return out


def plot_throughput(path: str | os.PathLike, rows: Sequence[dict], title: str) -> None:
    """Bar chart of tokens/s per mesh (estimated tokens/s for topology rows; meshes that do not
    fit are shown at 0 and labelled)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    estimated = any("topology" in r for r in rows)
    key = "est_tokens_per_sec" if estimated else "tokens_per_sec"
    names = [r["mesh"] or '""' for r in rows]
    values = [r.get(key) or 0.0 for r in rows]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(rows) + 2), 4.0))
    bars = ax.bar(range(len(rows)), values, color="#4c72b0")
    for bar, row in zip(bars, rows):
        label = "does not fit" if row.get("fits_hbm") is False else f"{bar.get_height():.3g}"
        ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(rows)), names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("estimated tokens/s (compiler roofline)" if estimated else "tokens/s")
    ax.set_title(title, fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def write_bench(directory: str | os.PathLike, rows: Sequence[dict], *, title: str,
                extra: dict) -> str:
    """Writes `directory/bench.{json,csv,md,png}` (`directory`: a local path or a URI); returns
    the Markdown table."""
    directory = run_path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    table = markdown_table(_with_mib(rows), columns_of(rows))
    (directory / "bench.md").write_text(f"# {title}\n\n{table}")
    names = list(dict.fromkeys(k for r in rows for k in r))
    (directory / "bench.csv").write_bytes(csv_text(rows, names).encode())
    (directory / "bench.json").write_text(
        json.dumps({"title": title, **extra, "rows": list(rows)}, indent=1))
    plot_throughput(directory / "bench.png", rows, title)
    return table
