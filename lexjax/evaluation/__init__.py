"""Evaluation: the scoring path (`Scorer`), length extrapolation ("train short, test long"),
attention resolution, reports."""
from lexjax.evaluation.extrapolation import LengthResult, evaluate_lengths, sliding_windows
from lexjax.evaluation.report import markdown_table, plot_curves, write_report
from lexjax.evaluation.resolution import attention_resolution, resolution
from lexjax.evaluation.scoring import Scorer

__all__ = ["Scorer", "LengthResult", "evaluate_lengths", "sliding_windows",
           "attention_resolution", "resolution", "markdown_table", "plot_curves", "write_report"]
