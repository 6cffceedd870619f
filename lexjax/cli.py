"""Shared command-line plumbing for `python -m lexjax.train / evaluate / bench`: t5x-style gin
flags (`--gin_file=F` repeatable, `--gin.NAME=VALUE` repeatable) and one clear line, no traceback,
for the errors a user can fix."""
from __future__ import annotations

import argparse
import ast
import contextlib
import errno
import os
import sys
from typing import Callable, Optional, Sequence

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


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str],
               first: Optional[Callable[[argparse.Namespace], None]] = None
               ) -> tuple[argparse.Namespace, list[str]]:
    """Parses known flags; every `--gin.NAME=VALUE` becomes a binding, anything else an error.
    Then runs `first(args)` (checks that should not wait for heavy imports) and, unless
    `--verbose`, imports TensorFlow with the native start-up noise silenced."""
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
    if first is not None:
        first(args)
    if not getattr(args, "verbose", False):
        import_tensorflow_quietly()
    return args, bindings


def add_gin_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gin_file", action="append", default=[],
                        help="gin file (repeatable; later files override earlier ones)")
    parser.add_argument("--verbose", action="store_true",
                        help="show the native libraries' start-up log lines")
    parser.epilog = ((parser.epilog or "") +
                     " Any --gin.NAME=VALUE binds a gin macro or parameter (repeatable), e.g. "
                     "--gin.TRAIN_STEPS=100 --gin.DTYPE=bfloat16.")


def add_distributed_flags(parser: argparse.ArgumentParser) -> None:
    """`--distributed [--coordinator_address=H:P --num_processes=N --process_id=I]`: every host
    of a multi-host run starts the same command; on Cloud TPU bare `--distributed` finds the
    others itself."""
    group = parser.add_argument_group("multi-host")
    group.add_argument("--distributed", action="store_true",
                       help="join a multi-host run (jax.distributed; also LEXJAX_DISTRIBUTED=1)")
    group.add_argument("--coordinator_address", default=None,
                       help="HOST:PORT of process 0 (auto-detected on Cloud TPU)")
    group.add_argument("--num_processes", type=int, default=None, help="processes in the run")
    group.add_argument("--process_id", type=int, default=None, help="this process, 0..N-1")


def join_distributed(args: argparse.Namespace) -> bool:
    """Joins the multi-host run the `add_distributed_flags` flags describe (before anything
    touches a device); returns whether this process is part of one."""
    from lexjax import partitioning
    return partitioning.initialize_distributed(
        args.distributed or None, coordinator_address=args.coordinator_address,
        num_processes=args.num_processes, process_id=args.process_id)


@contextlib.contextmanager
def native_stderr_silenced():
    """Points file descriptor 2, where C++ libraries log, at /dev/null for the duration (Python's
    own `sys.stderr` is flushed first and written again afterwards)."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def import_tensorflow_quietly() -> None:
    """Imports TensorFlow (seqio's data backend) without the absl / oneDNN / CUDA lines its
    native start-up writes even under TF_CPP_MIN_LOG_LEVEL=3, and hides the GPUs from it (as
    t5x does: only JAX computes, and TensorFlow would otherwise claim GPU memory); an import
    error is raised as usual by whatever needs TensorFlow, once stderr is back."""
    if "tensorflow" in sys.modules:
        return
    with native_stderr_silenced():
        try:
            import tensorflow as tf
        except ImportError:
            return
        tf.config.set_visible_devices([], "GPU")


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
    except UserError as e:
        code = getattr(e, "exit_code", 2)  # a run stopped by a signal: 128 + the signal
        print(f"{'error: ' if code == 2 else ''}{user_message(e)}", file=sys.stderr)
        sys.exit(code)
    except OSError as e:  # a missing file, permissions, a full disk
        print(f"error: {os_error_message(e)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def os_error_message(error: OSError) -> str:
    """`No space left on device: /runs/x/checkpoints/...` plus the usual fix."""
    fixes = {errno.ENOSPC: "free space or choose another --model_dir",
             errno.EACCES: "check the permissions or choose another path",
             errno.EROFS: "the file system is read-only; choose another path",
             errno.ENOENT: "check the path"}
    where = error.filename or ""
    text = error.strerror or str(error)
    fix = fixes.get(error.errno)
    return f"{text}{': ' + str(where) if where else ''}" + (f" ({fix})" if fix else "")
