"""Tables and plots of evaluation results: Markdown, CSV, JSON, and a PNG of a metric
(perplexity by default) against evaluation length (log-x, the training length marked)."""
from __future__ import annotations

import csv
import json
import os
from typing import Optional, Sequence

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


def write_csv(path: str, rows: Sequence[dict], columns: Sequence[str] = COLUMNS) -> None:
    columns = [c for c in columns if any(c in r for r in rows)]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def plot_curves(path: str, curves: dict[str, tuple[Sequence[int], Sequence[float]]], *,
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
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(directory: str, name: str, rows: Sequence[dict], *, title: str,
                 train_length: Optional[int], extra: Optional[dict] = None,
                 columns: Sequence[str] = COLUMNS, plotted: str = "perplexity") -> str:
    """Writes `directory/name.{md,csv,json,png}` (the plot: `plotted` against length);
    returns the Markdown table."""
    os.makedirs(directory, exist_ok=True)
    table = markdown_table(rows, columns)
    with open(os.path.join(directory, f"{name}.md"), "w") as f:
        f.write(f"# {title}\n\n{table}")
    write_csv(os.path.join(directory, f"{name}.csv"), rows, columns)
    with open(os.path.join(directory, f"{name}.json"), "w") as f:
        json.dump({"title": title, "train_length": train_length, "rows": list(rows),
                   **(extra or {})}, f, indent=1)
    plot_curves(os.path.join(directory, f"{name}.png"),
                {title: ([r["length"] for r in rows], [r[plotted] for r in rows])},
                train_length=train_length, title=title, ylabel=plotted.replace("_", " "))
    return table
