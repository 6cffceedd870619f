"""Local text corpora and their train/validation/test splits.

A `Corpus` is a sorted set of text files below a root directory. Every file belongs to exactly one
split, decided by the SHA-1 of its path relative to the root (POSIX separators), so that

* splits never mix: a file is in one split and all of its text goes there;
* the assignment is deterministic and independent of the machine: moving the corpus (or running
  on another host whose Python lives elsewhere) does not move any file between splits;
* adding or removing files leaves every other file's split unchanged.

Two corpora are defined here:

* `stdlib_corpus()`: the `.py` sources of the running interpreter's standard library (about
  1,800 files and 30 MB for CPython 3.11), found from `sysconfig.get_paths()["stdlib"]`; needs no
  download.
  `site-packages` (third-party code) and `__pycache__` are skipped. The standard library's own test
  suites (`test/`, `*/tests/`, `idlelib/idle_test/`, ...) are KEPT by default: they are ordinary
  Python and more than half of the text. `DataConfig(include_test_suites=False)` drops them
  (about 12 MB left).
* `text_files_corpus(pattern)`: any local files matching a glob (`**` recurses); the root is the
  glob's leading directory without wildcards. A run names the glob in its `DataConfig`.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import os
import sys
import sysconfig
from typing import Sequence

from lexjax.data.errors import DataError

SPLITS = ("train", "validation", "test")
SPLIT_FRACTIONS = (0.90, 0.05, 0.05)
TEST_SUITE_DIRS = frozenset({"test", "tests", "idle_test"})
_SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
_GLOB_MAGIC = frozenset("*?[")


def split_of(relpath: str, fractions: Sequence[float] = SPLIT_FRACTIONS) -> str:
    """The split ("train", "validation" or "test") of the file at `relpath`.

    The first 8 bytes of SHA-1(relpath) as a big-endian integer, divided by 2**64, give a number u
    uniform in [0, 1); the split is the first whose cumulative fraction exceeds u.

    Args:
      relpath: path relative to the corpus root, with "/" separators.
      fractions: fractions of train, validation and test; they must sum to 1.
    """
    digest = hashlib.sha1(relpath.encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    cumulative = 0.0
    for split, fraction in zip(SPLITS, fractions):
        cumulative += fraction
        if u < cumulative:
            return split
    return SPLITS[-1]


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Text files below `root`, listed by path relative to it.

    Attributes:
      description: what the corpus is, for messages (e.g. the glob it came from).
      root: absolute directory that `relpaths` are relative to.
      relpaths: sorted, "/"-separated paths of the files, relative to `root`.
    """
    description: str
    root: str
    relpaths: tuple[str, ...]

    def relpaths_of(self, split: str) -> list[str]:
        """Sorted relative paths of the files in `split`."""
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r} of {self.description}; use one of {SPLITS}")
        return [p for p in self.relpaths if split_of(p) == split]

    def files(self, split: str) -> list[str]:
        """Absolute paths of the files in `split`, sorted by relative path."""
        return [os.path.join(self.root, *p.split("/")) for p in self.relpaths_of(split)]

    def fingerprint(self) -> str:
        """Hex digest of every file's relative path, size and modification time.

        Changes whenever a file is added, removed or modified (without reading the files), so it
        keys caches of the tokenized corpus.
        """
        h = hashlib.sha1()
        for relpath in self.relpaths:
            stat = os.stat(os.path.join(self.root, *relpath.split("/")))
            h.update(f"{relpath}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode("utf-8"))
        return h.hexdigest()


def stdlib_root() -> str:
    """Directory of the running interpreter's standard library."""
    return os.path.realpath(sysconfig.get_paths()["stdlib"])


def is_test_suite(relpath: str) -> bool:
    """Whether the file at `relpath` belongs to one of the standard library's test suites."""
    return any(part in TEST_SUITE_DIRS for part in relpath.split("/")[:-1])


def stdlib_corpus(include_test_suites: bool = True) -> Corpus:
    """The `.py` files of the Python standard library (see the module docstring).

    Args:
      include_test_suites: keep the standard library's test suites (default True).
    """
    root = stdlib_root()
    relpaths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIPPED_DIRS)
        reldir = os.path.relpath(dirpath, root)
        for name in filenames:
            if name.endswith(".py"):
                relpath = name if reldir == "." else f"{reldir}/{name}".replace(os.sep, "/")
                relpaths.append(relpath)
    if not include_test_suites:
        relpaths = [p for p in relpaths if not is_test_suite(p)]
    if not relpaths:
        raise DataError(f"no .py files under the standard library directory {root!r}")
    return Corpus(f"the Python standard library at {root!r}", root, tuple(sorted(relpaths)))


def glob_root(pattern: str) -> str:
    """The leading directories of `pattern` that contain no wildcard, as an absolute path.

    E.g. "/data/books/**/*.txt" -> "/data/books"; "notes/a.txt" -> "<cwd>/notes".
    """
    parts = os.path.abspath(os.path.expanduser(pattern)).split(os.sep)
    fixed = []
    for part in parts[:-1]:  # The last part names files, never the root.
        if _GLOB_MAGIC & set(part):
            break
        fixed.append(part)
    return os.sep.join(fixed) or os.sep


_BINARY_PROBE_BYTES = 8192
_reported_binary: set[str] = set()


def is_binary(path: str) -> bool:
    """Whether a file looks like binary data, not text: a NUL byte in its first 8 KB (what git
    and grep check)."""
    with open(path, "rb") as f:
        return b"\0" in f.read(_BINARY_PROBE_BYTES)


def text_files_corpus(pattern: str | None) -> Corpus:
    """The text files matching the glob `pattern` (`**` matches any number of directories).
    Binary files (`is_binary`) are skipped, their count reported once on stderr; invalid UTF-8
    in a text file is read as U+FFFD (see `lexjax.data.tasks`).

    Raises:
      DataError: naming the glob and the fix, if there is none or it matches no text file.
    """
    if not pattern:
        raise DataError(
            "the lexjax.text_files task needs a glob of text files: set TEXT_FILES_GLOB with "
            "configs/data/text_files.gin (DataConfig.text_files_glob), e.g. "
            "'/path/to/corpus/**/*.txt'")
    root = glob_root(pattern)
    matches = glob.glob(os.path.expanduser(pattern), recursive=True)
    files = [path for path in matches if os.path.isfile(path)]
    text = [path for path in files if not is_binary(path)]
    if len(text) < len(files) and pattern not in _reported_binary:
        _reported_binary.add(pattern)
        print(f"lexjax.text_files: skipped {len(files) - len(text)} of {len(files)} files "
              f"matching {pattern!r} that are not text (a NUL byte in their first 8 KB)",
              file=sys.stderr)
    relpaths = sorted({os.path.relpath(os.path.abspath(path), root).replace(os.sep, "/")
                       for path in text})
    if not relpaths:
        raise DataError(
            f"the glob {pattern!r} matches no text files (searched from {root!r}); set "
            "TEXT_FILES_GLOB (DataConfig.text_files_glob) to a glob of existing text files, "
            "e.g. '/path/to/corpus/**/*.txt'")
    return Corpus(f"the text files {pattern!r}", root, tuple(relpaths))
