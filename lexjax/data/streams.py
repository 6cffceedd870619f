"""Token streams: a task's split as numpy documents, either streamed or materialised on disk.

This is the only module that iterates `tf.data`; everything it returns is numpy.

A split of a local task (`tasks.is_local`) is small enough to hold as one flat array: the
documents' tokens, each followed by EOS, concatenated in corpus order (sorted relative path). It
is built once through the seqio task and cached under

    <cache root>/<task>/<vocabulary id>/<corpus fingerprint>/<split>.{tokens.npy,doc_starts.npy,
                                                                       json}

where the cache root is, in order: the `cache_dir` argument, `$LEXJAX_DATA_CACHE`,
`$XDG_CACHE_HOME/lexjax/data`, `~/.cache/lexjax/data`. The corpus fingerprint covers every file's
relative path, size and modification time, and the vocabulary id a SentencePiece model's hash, so
a changed corpus or vocabulary never reads stale tokens; delete the root to reclaim disk. Files are
written to temporary names and renamed, so concurrent builders (several hosts or test workers
sharing a cache) never see partial files. Arrays are loaded memory-mapped.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from typing import Iterator

import numpy as np
import seqio

from lexjax.data import tasks
from lexjax.data.config import DataConfig
from lexjax.data.errors import DataError
from lexjax.data.vocab import vocabulary_id

CACHE_ENV = "LEXJAX_DATA_CACHE"
#: Bump when the cached format or the tokenization pipeline changes.
CACHE_FORMAT_VERSION = 1


def cache_root(cache_dir: str | None = None) -> str:
    """The directory holding materialised token streams (see the module docstring)."""
    if cache_dir:
        return cache_dir
    if os.environ.get(CACHE_ENV):
        return os.environ[CACHE_ENV]
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "lexjax", "data")


def iter_documents(task: seqio.Task, split: str, *, shuffle: bool = False,
                   seed: int | None = None, num_epochs: int | None = 1,
                   with_labels: bool = False) -> Iterator[tuple]:
    """Each document of a split as (int32 tokens `[n]` ending with EOS, its UTF-8 text).

    The dataset is built before this returns, so a missing split or dataset raises here, not at
    the first `next()`.

    Args:
      task: a lexjax seqio task.
      split: the split to read.
      shuffle: shuffle files and documents (seqio's buffer), deterministically given `seed`.
      seed: the shuffling seed.
      num_epochs: passes over the split; None repeats forever (reshuffling each pass).
      with_labels: also yield each document's int "label" (classification tasks): triples.
    """
    tasks.check_split(task, split)
    try:
        # try_in_mem_cache=False: seqio would ask TFDS for the split's size to decide whether
        # to cache it in memory, which fails on datasets without split metadata (mock data).
        ds = task.get_dataset(sequence_length=None, split=split, shuffle=shuffle, seed=seed,
                              num_epochs=num_epochs, try_in_mem_cache=False)
    except AssertionError as e:  # How TFDS reports a dataset that is not prepared.
        raise DataError(
            f"task {task.name!r} cannot read its split {split!r}: {str(e).splitlines()[0]} "
            "TFDS corpora are never downloaded at run time: prepare the dataset with `tfds build` "
            "on a machine with network access and point TFDS_DATA_DIR at it") from e
    if with_labels:
        return ((ex["targets"], ex["targets_pretokenized"], int(ex["label"]))
                for ex in ds.as_numpy_iterator())
    return ((ex["targets"], ex["targets_pretokenized"]) for ex in ds.as_numpy_iterator())


@dataclasses.dataclass(frozen=True)
class TokenStream:
    """A split as one flat token array.

    Attributes:
      tokens: `[num_tokens]` uint16 (int32 for vocabularies over 65,536 ids): the documents'
        tokens, each document followed by EOS, in corpus order.
      doc_starts: `[num_documents + 1]` int64 offsets; document i (with its EOS) is
        `tokens[doc_starts[i]:doc_starts[i + 1]]`, and `doc_starts[-1] == num_tokens`.
      text_bytes: total UTF-8 bytes of the documents' text.
      labels: int32 `[num_documents]`, each document's class (classification tasks), else None.
    """
    tokens: np.ndarray
    doc_starts: np.ndarray
    text_bytes: int
    labels: np.ndarray | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_documents(self) -> int:
        return int(self.doc_starts.shape[0]) - 1


def build_token_stream(documents: Iterator[tuple], vocab_size: int) -> TokenStream:
    """Concatenates `(tokens, text)` documents, or `(tokens, text, label)` ones (then the
    stream has labels), into a `TokenStream` (in memory)."""
    dtype = np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
    pieces, lengths, text_bytes, labels = [], [0], 0, []
    for tokens, text, *label in documents:
        pieces.append(tokens.astype(dtype, copy=False))
        lengths.append(tokens.shape[0])
        text_bytes += len(text)
        labels += label
    tokens = np.concatenate(pieces) if pieces else np.zeros([0], dtype)
    return TokenStream(tokens, np.cumsum(lengths, dtype=np.int64), text_bytes,
                       np.asarray(labels, np.int32) if labels else None)


def materialized_stream(data: DataConfig, split: str, cache_dir: str | None = None
                        ) -> TokenStream:
    """The `TokenStream` of a split of a local task, or of any classification task (with its
    labels): loaded from the cache, built there if absent.

    Raises:
      DataError: if the split has no files.
    """
    task_name, vocabulary = data.task, data.seqio_vocabulary()
    task = tasks.get_task(data)
    tasks.check_split(task, split)
    source, description = _source_identity(data, split)
    key = hashlib.sha1(f"{CACHE_FORMAT_VERSION}\0{source}".encode()).hexdigest()
    directory = os.path.join(cache_root(cache_dir), task_name, vocabulary_id(vocabulary),
                             key[:16])
    labelled = tasks.has_labels(task_name)
    names = ("tokens.npy", "doc_starts.npy", "json") + (("labels.npy",) if labelled else ())
    paths = {name: os.path.join(directory, f"{split}.{name}") for name in names}
    if not os.path.exists(paths["json"]):  # Written last: its presence means the rest is there.
        stream = build_token_stream(iter_documents(task, split, with_labels=labelled),
                                    int(vocabulary.vocab_size))
        if stream.num_documents == 0:
            raise DataError(f"split {split!r} of task {task_name!r} has no documents")
        os.makedirs(directory, exist_ok=True)
        _atomic_write(paths["tokens.npy"], lambda f: np.save(f, stream.tokens))
        _atomic_write(paths["doc_starts.npy"], lambda f: np.save(f, stream.doc_starts))
        if labelled:
            _atomic_write(paths["labels.npy"], lambda f: np.save(f, stream.labels))
        meta = {"task": task_name, "split": split, "vocabulary": vocabulary_id(vocabulary),
                "corpus": description, "num_documents": stream.num_documents,
                "num_tokens": stream.num_tokens, "text_bytes": stream.text_bytes}
        _atomic_write(paths["json"], lambda f: f.write(json.dumps(meta, indent=1).encode()))
    with open(paths["json"], "rb") as f:
        meta = json.load(f)
    return TokenStream(np.load(paths["tokens.npy"], mmap_mode="r"),
                       np.load(paths["doc_starts.npy"]), int(meta["text_bytes"]),
                       np.load(paths["labels.npy"]) if labelled else None)


def _source_identity(data: DataConfig, split: str) -> tuple[str, str]:
    """(what keys the cache, a description) of a task's source: a local corpus's fingerprint,
    or a TFDS dataset's name, version and data directory."""
    if not tasks.is_local(data.task):
        name = tasks.tfds_name(data.task)
        data_dir = os.environ.get("TFDS_DATA_DIR", "")
        return f"tfds\0{name}\0{data_dir}", f"tfds {name}"
    corpus = tasks.local_corpus(data)
    if not corpus.relpaths_of(split):
        raise DataError(
            f"split {split!r} of task {data.task!r} is empty: none of the "
            f"{len(corpus.relpaths)} files of {corpus.description} hashes to it (files are split "
            "about 90/5/5% by a hash of their path); add files or use another split")
    return corpus.fingerprint(), corpus.description


def _atomic_write(path: str, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide a shared cache from other users.
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
