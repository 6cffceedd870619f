"""Run-directory paths, local or remote, through one abstraction: `etils.epath`.

A run directory (`--model_dir`, `--init_from`, `--out`) is a local path or a URI that epath
reads and writes (`gs://`, `s3://`, `az://`; on GCS through TensorFlow's file system, as orbax
does). `run_path` resolves a local path to an absolute one, as the trainer always has, and leaves
a URI as it is: `os.path.abspath("gs://bucket/run")` would name a local `./gs:/bucket/run`.
"""
from __future__ import annotations

import os

from etils import epath


def is_remote(path: str | os.PathLike) -> bool:
    """Whether `path` is a URI (`gs://bucket/run`) rather than a local path."""
    return "://" in os.fspath(path)


def run_path(path: str | os.PathLike) -> epath.Path:
    """`path` as an `epath.Path`: a local path made absolute (against the working directory),
    a URI unchanged."""
    return epath.Path(path if is_remote(path) else os.path.abspath(path))


def write_text_atomic(path: epath.Path, text: str) -> None:
    """Writes `text` to `path` through `path.tmp` and a replace, so a reader sees the old text or
    the new, never part of it (on GCS, where a replace is a copy, a finished object either
    way)."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    temporary.replace(path)
