"""The zoo's headline study: train short, test long, for every (architecture x position scheme).

    python experiments/extrapolation.py --gin_file=configs/experiments/extrapolation_small.gin \
        --out=experiments/results/extrapolation_small [--shard=0/1] [--only=transformer/alibi]

Each cell of the gin-listed matrix ("model/scheme", "model/scheme+bca" or "+window" (the run of
"model/scheme" evaluated under blockwise causal attention, or a sliding window of the training
length), or "model/default" for a model's own default scheme; a suffix "[MACRO=VALUE,...]" adds
that cell's own bindings, e.g. a narrower MLP_DIM to meet the parameter budget) trains with the
same run gin and size overrides (same tokens, steps, and parameter budget: non-embedding
parameter counts are reported and checked within +-10%), in
its own run directory `OUT/cells/<model>__<scheme>`, then is evaluated at every listed length on
the test split. Finished cells are skipped, so an interrupted study resumes where it stopped;
`--shard=i/n` runs every n-th cell (one process per host). The report (`OUT/extrapolation.{md,
csv,json,png}`) is rebuilt from whatever cells have finished.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from typing import Optional, Sequence

import gin

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from commands import binding_flags, run_logged  # noqa: E402


@gin.configurable(module="experiments")
@dataclasses.dataclass(frozen=True)
class Study:
    """One study: a matrix of cells trained and evaluated alike.

    Attributes:
      matrix: cells "model/scheme" (scheme: a configs/positions name or "default"; "+bca" adds
        blockwise causal attention at evaluation to the run of "model/scheme", "+window" a
        sliding window of the training length: `INFERENCE_MASKS`).
      run_gin: the run gin every cell trains with (binds the run macros).
      overrides: gin bindings applied after the model and position gins (sizes, steps, ...).
      eval_lengths: evaluation lengths (the first is usually TRAIN_LENGTH).
      eval_tokens: tokens evaluated per length.
      param_tolerance: allowed relative spread of non-embedding parameter counts.
    """

    matrix: Sequence[str] = ()
    run_gin: str = "configs/runs/quickstart.gin"
    overrides: Sequence[str] = ()
    eval_lengths: Sequence[int] = (128, 256, 512, 1024, 2048)
    eval_tokens: int = 16384
    eval_batch_size: int = 4
    param_tolerance: float = 0.10


#: Cell suffixes that evaluate the run of the base cell under another inference mask: the
#: `lexjax.evaluate` flag of each.
INFERENCE_MASKS = {"bca": "--bca", "window": "--window"}


@dataclasses.dataclass(frozen=True)
class Cell:
    model: str
    scheme: str  # a configs/positions name or "default"
    inference: str = ""  # "" or a key of INFERENCE_MASKS
    bindings: tuple[str, ...] = ()  # the cell's own gin bindings, after the study's overrides

    @classmethod
    def parse(cls, text: str) -> "Cell":
        text, _, extra = text.partition("[")
        bindings = tuple(b.strip() for b in extra.rstrip("]").split(",") if b.strip())
        model, _, scheme = text.partition("/")
        scheme, _, inference = scheme.partition("+")
        if inference and inference not in INFERENCE_MASKS:
            raise ValueError(f"unknown cell suffix +{inference} in {text!r}; use one of "
                             f"{['+' + name for name in INFERENCE_MASKS]}")
        return cls(model, scheme or "default", inference, bindings)

    @property
    def name(self) -> str:
        extra = f"[{','.join(self.bindings)}]" if self.bindings else ""
        suffix = f"+{self.inference}" if self.inference else ""
        return f"{self.model}/{self.scheme}{suffix}{extra}"

    def overrides(self, study: "Study") -> list[str]:
        return [*study.overrides, *self.bindings]

    @property
    def run_name(self) -> str:  # +bca / +window cells share the run of their base cell
        return f"{self.model}__{self.scheme}"

    @property
    def eval_name(self) -> str:
        """The evaluation's file stem under the run's eval/ directory."""
        return "extrapolation" + (f"_{self.inference}" if self.inference else "")

    def gin_files(self, study: Study) -> list[str]:
        files = [study.run_gin, f"configs/models/{self.model}.gin"]
        if self.scheme != "default":
            files.append(f"configs/positions/{self.scheme}.gin")
        return files


def non_embedding_parameters(cell: Cell, study: Study) -> int:
    """Parameters outside the token and absolute-position embedding tables."""
    import jax
    import jax.numpy as jnp
    import flax.linen as nn
    import lexjax

    model = lexjax.build_model(cell.gin_files(study), cell.overrides(study))
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                            jax.ShapeDtypeStruct((1, 8), jnp.int32))["params"]
    leaves = jax.tree_util.tree_flatten_with_path(nn.unbox(params))[0]
    embedding_tables = ("['token_embedding']", "['position']['embedding']")
    return int(sum(x.size for path, x in leaves
                   if not any(t in jax.tree_util.keystr(path) for t in embedding_tables)))


def run_cell(cell: Cell, study: Study, out: str) -> dict:
    """Trains (unless done) and evaluates (unless done) one cell; returns its result record."""
    run_dir = os.path.join(out, "cells", cell.run_name)
    name = cell.eval_name
    result_path = os.path.join(run_dir, "eval", f"{name}.json")
    if os.path.exists(result_path):
        return json.load(open(result_path))
    os.makedirs(run_dir, exist_ok=True)
    log = os.path.join(run_dir, "log.txt")
    started = time.time()
    run_logged([sys.executable, "-m", "lexjax.train",
                *[f"--gin_file={f}" for f in cell.gin_files(study)],
                *binding_flags(cell.overrides(study)), f"--model_dir={run_dir}"], log)
    trained = time.time()
    run_logged([sys.executable, "-m", "lexjax.evaluate", f"--model_dir={run_dir}",
                "--lengths=" + ",".join(map(str, study.eval_lengths)),
                f"--max_tokens={study.eval_tokens}", f"--batch_size={study.eval_batch_size}",
                f"--name={name}",
                *([INFERENCE_MASKS[cell.inference]] if cell.inference else [])], log)
    record = json.load(open(result_path))
    record["seconds"] = {"train": trained - started, "evaluate": time.time() - trained}
    with open(result_path, "w") as f:
        json.dump(record, f, indent=1)
    return record


def _fmt(value: Optional[float]) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.2f}" if value < 1e4 else f"{value:.2e}"


def build_report(study: Study, cells: Sequence[Cell], records: dict, params: dict,
                 out: str, train_length: Optional[int]) -> str:
    """Writes OUT/extrapolation.{md,csv,json,png} from finished cells; returns the Markdown."""
    from lexjax.evaluation.report import plot_curves

    lengths = list(study.eval_lengths)
    header = ["model / scheme"] + [f"ppl@{n}" for n in lengths] + [
        f"R@{lengths[0]}", f"R@{lengths[1] if len(lengths) > 1 else lengths[0]}", "params (non-emb.)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    rows, curves = [], {}
    for cell in cells:
        record = records.get(cell.name)
        by_length = {r["length"]: r for r in (record or {}).get("rows", [])}
        ppl = [by_length.get(n, {}).get("perplexity") for n in lengths]
        res = [by_length.get(n, {}).get("resolution") for n in lengths[:2]]
        row = {"cell": cell.name, "params": params.get(cell.name),
               **{f"ppl@{n}": p for n, p in zip(lengths, ppl)},
               **{f"resolution@{n}": r for n, r in zip(lengths[:2], res)},
               "seconds": (record or {}).get("seconds")}
        rows.append(row)
        lines.append("| " + " | ".join([cell.name, *map(_fmt, ppl),
                                         *("-" if r is None else f"{r:.3g}" for r in res),
                                         str(params.get(cell.name, "-"))]) + " |")
        if record:
            done = [(n, p) for n, p in zip(lengths, ppl) if p is not None]
            curves[cell.name] = ([n for n, _ in done], [p for _, p in done])
    table = "\n".join(lines) + "\n"
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "extrapolation.md"), "w") as f:
        f.write(table)
    with open(os.path.join(out, "extrapolation.json"), "w") as f:
        json.dump({"study": dataclasses.asdict(study), "train_length": train_length,
                   "rows": rows}, f, indent=1)
    with open(os.path.join(out, "extrapolation.csv"), "w") as f:
        keys = list(rows[0]) if rows else []
        f.write(",".join(keys) + "\n")
        for row in rows:
            f.write(",".join("" if row[k] is None else str(row[k]) for k in keys) + "\n")
    if curves:
        plot_curves(os.path.join(out, "extrapolation.png"), curves, train_length=train_length,
                    title="Train short, test long: perplexity vs evaluation length")
    return table


def check_parameter_budget(params: dict, tolerance: float) -> Optional[str]:
    counts = [c for c in params.values() if c]
    if not counts:
        return None
    spread = max(counts) / min(counts) - 1
    if spread > tolerance:
        return (f"non-embedding parameter counts differ by {spread:.0%} (> {tolerance:.0%}): "
                f"{params}")
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gin_file", action="append", required=True,
                        help="study gin (configs/experiments/extrapolation_*.gin)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--shard", default="0/1", help="i/n: run every n-th cell from the i-th")
    parser.add_argument("--only", action="append", default=[], help="run only these cells")
    parser.add_argument("--report_only", action="store_true",
                        help="rebuild the report from finished cells, train nothing")
    args = parser.parse_args(argv)

    import lexjax  # noqa: F401  (registers the configurables the study gin may name)
    gin.parse_config_files_and_bindings(args.gin_file, [])
    study = Study()
    gin.clear_config()
    cells = [Cell.parse(c) for c in study.matrix]
    index, count = (int(x) for x in args.shard.split("/"))
    mine = [c for i, c in enumerate(cells) if i % count == index
            and (not args.only or c.name in args.only)]
    train_length = next((int(b.split("=")[1]) for b in study.overrides
                         if b.replace(" ", "").startswith("TRAIN_LENGTH=")), None)
    params = {c.name: non_embedding_parameters(c, study) for c in cells}
    warning = check_parameter_budget(params, study.param_tolerance)
    if warning:
        print("warning:", warning, file=sys.stderr)
    records = {}
    for cell in cells:
        path = os.path.join(args.out, "cells", cell.run_name, "eval", cell.eval_name + ".json")
        if os.path.exists(path):
            records[cell.name] = json.load(open(path))
    for cell in mine if not args.report_only else []:
        if cell.name in records:
            continue
        print(f"[{time.strftime('%H:%M:%S')}] {cell.name}", file=sys.stderr, flush=True)
        try:
            records[cell.name] = run_cell(cell, study, args.out)
        except RuntimeError as e:
            print(f"  failed: {e}", file=sys.stderr)
        build_report(study, cells, records, params, args.out, train_length)
    print(build_report(study, cells, records, params, args.out, train_length))
    return 0


if __name__ == "__main__":
    sys.exit(main())
