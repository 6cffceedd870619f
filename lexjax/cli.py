"""Shared command-line plumbing for `python -m lexjax.train / evaluate / bench`: t5x-style gin
flags (`--gin_file=F` repeatable, `--gin.NAME=VALUE` repeatable) and one clear line, no traceback,
for the errors a user can fix."""
from __future__ import annotations

import argparse
import ast
import os
import sys
from typing import Callable, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def gin_binding(name: str, value: str) -> str:
    """`--gin.NAME=VALUE` -> a gin binding; bare words become strings (`DTYPE=bfloat16`)."""
    text = value.strip()
    if not text or text[0] in "@%[({'\"" or text in ("True", "False", "None"):
        return f"{name} = {text}"
    try:
        ast.literal_eval(text)
        return f"{name} = {text}"
    except (ValueError, SyntaxError):
        return f"{name} = {text!r}"


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str]
               ) -> tuple[argparse.Namespace, list[str]]:
    """Parses known flags; every `--gin.NAME=VALUE` becomes a binding, anything else an error."""
    args, rest = parser.parse_known_args(argv)
    bindings, unknown = [], []
    for item in rest:
        if item.startswith("--gin.") and "=" in item:
            name, value = item[len("--gin."):].split("=", 1)
            bindings.append(gin_binding(name, value))
        else:
            unknown.append(item)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (gin bindings are "
                     "--gin.NAME=VALUE)")
    return args, bindings


def add_gin_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gin_file", action="append", default=[],
                        help="gin file (repeatable; later files override earlier ones)")
    parser.epilog = ((parser.epilog or "") +
                     " Any --gin.NAME=VALUE binds a gin macro or parameter (repeatable), e.g. "
                     "--gin.TRAIN_STEPS=100 --gin.DTYPE=bfloat16.")


def user_message(error: BaseException) -> str:
    """The error's own message, without the "In call to configurable ..." lines gin appends."""
    return str(error).split("\n  In call to configurable")[0].strip()


def run_main(main: Callable[[], int]) -> None:
    """Runs `main`, turning the errors a user can fix into one line on stderr and exit code 2."""
    from absl import logging as absl_logging

    from lexjax.errors import UserError
    absl_logging.set_verbosity(absl_logging.ERROR)  # orbax's info/warnings are not for users
    try:
        sys.exit(main())
    except (UserError, FileNotFoundError) as e:
        print(f"error: {user_message(e)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
