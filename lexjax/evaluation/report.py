"""Tables and plots of evaluation results: Markdown, CSV, JSON, and a PNG of a metric
(perplexity by default) against evaluation length (log-x, the training length marked).
Written through `etils.epath`, so the directory may be a URI (`gs://bucket/run/eval`)."""
from __future__ import annotations

import csv
import io
import json
import os
from typing import Optional, Sequence

from etils import epath

from lexjax.paths import run_path

COLUMNS = ("length", "x_train", "loss", "perplexity", "bits_per_byte", "resolution", "windows",
           "scored_tokens")
#: Masked-LM evaluation (`lexjax.evaluation.masked`).
MASKED_COLUMNS = ("length", "x_train", "masked_loss", "masked_accuracy", "masked_tokens",
                  "windows")
#: Classification (`lexjax.evaluation.classify`).
CLASSIFICATION_COLUMNS = ("length", "x_train", "accuracy", "f1", "mcc", "loss",
                          "majority_baseline", "examples")


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    return str(value)


def markdown_table(rows: Sequence[dict], columns: Sequence[str] = COLUMNS) -> str:
    columns = [c for c in columns if any(c in r for r in rows)]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def csv_text(rows: Sequence[dict], columns: Sequence[str], **options) -> str:
    """`rows` as CSV text with a header of `columns` (`options`: `csv.DictWriter`'s)."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns, **options)
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def write_csv(path: str | os.PathLike, rows: Sequence[dict],
              columns: Sequence[str] = COLUMNS) -> None:
    """`rows` as CSV at `path`, a local path or a URI (written as bytes: line ends as csv
    makes them)."""
    columns = [c for c in columns if any(c in r for r in rows)]
    epath.Path(path).write_bytes(csv_text(rows, columns, extrasaction="ignore").encode())


def save_figure(fig, path: str | os.PathLike) -> None:
    """Saves a matplotlib figure at `path`, a local path or a URI, in the format its suffix
    names (PNG without one)."""
    path = epath.Path(path)
    with path.open("wb") as f:
        fig.savefig(f, format=path.suffix.lstrip(".") or "png", dpi=120)


def plot_curves(path: str | os.PathLike,
                curves: dict[str, tuple[Sequence[int], Sequence[float]]], *,
                train_length: Optional[int], ylabel: str = "perplexity", title: str = "",
                xlabel: str = "evaluation length (tokens)",
                log_y: Optional[bool] = None) -> None:
    """One line per name: `{name: (lengths, values)}`; log-x, and log-y if `log_y` (default:
    for perplexity)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, (xs, ys) in curves.items():
        ax.plot(xs, ys, marker="o", label=name)
    ax.set_xscale("log", base=2)
    if ylabel == "perplexity" if log_y is None else log_y:
        ax.set_yscale("log")
    if train_length:
        ax.axvline(train_length, color="gray", linestyle="--", linewidth=1,
                   label=f"train length {train_length}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def write_report(directory: str | os.PathLike, name: str, rows: Sequence[dict], *, title: str,
                 train_length: Optional[int], extra: Optional[dict] = None,
                 columns: Sequence[str] = COLUMNS, plotted: str = "perplexity") -> str:
    """Writes `directory/name.{md,csv,json,png}` (the plot: `plotted` against length);
    returns the Markdown table. `directory`: a local path or a URI."""
    directory = run_path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows, columns)
    (directory / f"{name}.md").write_text(f"# {title}\n\n{table}")
    write_csv(directory / f"{name}.csv", rows, columns)
    (directory / f"{name}.json").write_text(json.dumps(
        {"title": title, "train_length": train_length, "rows": list(rows), **(extra or {})},
        indent=1))
    plot_curves(directory / f"{name}.png",
                {title: ([r["length"] for r in rows], [r[plotted] for r in rows])},
                train_length=train_length, title=title, ylabel=plotted.replace("_", " "))
    return table
