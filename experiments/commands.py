"""How the study runners launch lexjax's CLIs: gin bindings as flags, and each command logged
(with its output) to the cell's log file, paths shown relative to the repository."""
from __future__ import annotations

import os
import subprocess
from typing import Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def binding_flags(bindings: Sequence[str]) -> list[str]:
    """Gin bindings `NAME = VALUE` as `--gin.NAME=VALUE` flags."""
    return [f"--gin.{b.replace(' ', '')}" for b in bindings]


def _shown(arg: str) -> str:
    """A command argument as the log shows it: paths relative to the repository."""
    return arg.replace(REPO + os.sep, "")


def run_logged(cmd: list[str], log_path: str) -> None:
    """Runs `cmd` in the repository, appending the command and its output to `log_path`;
    a RuntimeError naming the log if it fails."""
    with open(log_path, "a") as log:
        log.write("$ " + " ".join(_shown(a) for a in cmd) + "\n")
        log.flush()
        proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise RuntimeError(f"command failed (exit {proc.returncode}), see {log_path}: "
                           + " ".join(cmd))
