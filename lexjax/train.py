"""Train a model: `python -m lexjax.train --gin_file=configs/runs/quickstart.gin
[--gin_file=...] [--gin.NAME=VALUE ...] --model_dir=DIR [--init_from=OTHER_DIR]
[--distributed [--coordinator_address=HOST:PORT --num_processes=N --process_id=I]]`.

Resumes from DIR's latest checkpoint; `--init_from` starts a fine-tune from another run's
parameters. See configs/runs/quickstart.gin for the run macros. Multi-host: every host runs the
same command with `--distributed`; process 0 writes the run directory's files.
"""
from __future__ import annotations

import argparse
import os
import sys

from lexjax import cli


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lexjax.train", description=__doc__)
    cli.add_gin_flags(parser)
    parser.add_argument("--model_dir", required=True, help="run directory (created if needed)")
    parser.add_argument("--init_from", default=None,
                        help="model_dir of a trained run whose parameters start this one")
    cli.add_distributed_flags(parser)
    args, bindings = cli.parse_args(parser, sys.argv[1:] if argv is None else argv,
                                    first=claim_model_dir)

    from lexjax.config import check_bindings_used, parse_gin
    from lexjax.runs import configured_training
    from lexjax.training import train
    cli.join_distributed(args)
    parse_gin(args.gin_file, bindings)
    check_bindings_used(bindings)
    model, config = configured_training()  # what the run gin binds to train: one-line errors
    train(model, config, args.model_dir, args.init_from)
    return 0


def claim_model_dir(args: argparse.Namespace) -> None:
    """Before the slow imports: the model_dir must be writable and not in use by another trainer
    (the lock is held until this process ends; `train` takes it again). Skipped for multi-host
    runs, where process 0 locks in `train`."""
    from lexjax.run_dir import RunLock, check_writable
    if getattr(args, "distributed", False) or os.environ.get(
            "LEXJAX_DISTRIBUTED", "").lower() in ("1", "true", "yes"):
        return
    check_writable(args.model_dir)
    RunLock(args.model_dir).acquire()


if __name__ == "__main__":
    cli.run_main(main)
