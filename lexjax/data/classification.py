"""Classification data: labelled documents cut into fixed-length rows.

A classification task's split is materialised like a local corpus (`streams.materialized_stream`,
cached on disk, labels included) and cut into examples of `length` tokens:

- `windows="all"` (the embedded `lexjax.stdlib_is_test`): every piece of `length` tokens of a
  document is one example with the document's label (a long file gives many windows);
- `windows="first"` (GLUE): the document's first `length` tokens (longer texts are truncated).

Rows are padded after the text with PAD (id 0); `segment_ids` are 1 on text and 0 on padding.
Training batches are a pure function of (seed, step), as for the LM tasks.

    info = task_info("lexjax.stdlib_is_test")      # ClassificationTask: classes, metrics
    rows = classification_examples(data, length=512, split="test")
    # {"inputs": [E, 512], "segment_ids": [E, 512], "label": [E]}
    batches = classification_batches(data, length=512, batch_size=32, seed=0)
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Iterator, Optional

import numpy as np

from lexjax.data import images, packing, streams, tasks
from lexjax.data.config import DataConfig, as_data_config
from lexjax.data.errors import DataError

Rows = dict  # {"inputs": int32 [E, length], "segment_ids": int32 [E, length], "label": int32 [E]}


@dataclasses.dataclass(frozen=True)
class ClassificationTask:
    """What a classification task predicts and how it is scored.

    Attributes:
      labels: the class names, by label id.
      metrics: reported besides accuracy: "f1" (binary, of class 1), "mcc" (Matthews).
      windows: "all" pieces of a document are examples, or only the "first" (truncation).
    """
    labels: tuple[str, ...]
    metrics: tuple[str, ...] = ()
    windows: str = "first"

    @property
    def num_classes(self) -> int:
        return len(self.labels)


CLASSIFICATION_TASKS: dict[str, ClassificationTask] = {
    tasks.STDLIB_IS_TEST: ClassificationTask(("library", "test suite"), ("f1", "mcc"), "all"),
    "lexjax.glue_cola": ClassificationTask(("unacceptable", "acceptable"), ("mcc",)),
    "lexjax.glue_sst2": ClassificationTask(("negative", "positive")),
    "lexjax.glue_mrpc": ClassificationTask(("not_equivalent", "equivalent"), ("f1",)),
    "lexjax.glue_qqp": ClassificationTask(("not_duplicate", "duplicate"), ("f1",)),
    "lexjax.glue_mnli": ClassificationTask(("entailment", "neutral", "contradiction")),
    "lexjax.glue_qnli": ClassificationTask(("entailment", "not_entailment")),
    "lexjax.glue_rte": ClassificationTask(("entailment", "not_entailment")),
    **{name: ClassificationTask(task.labels) for name, task in images.IMAGE_TASKS.items()},
}


def task_info(task: str) -> ClassificationTask:
    """The metadata of a classification task; a DataError naming them for any other task."""
    if task not in CLASSIFICATION_TASKS:
        raise DataError(f"{task!r} is not a classification task; use one of "
                        f"{sorted(CLASSIFICATION_TASKS)} (MIXTURE_OR_TASK_NAME)")
    return CLASSIFICATION_TASKS[task]


def _pieces(data: DataConfig, split: str, length: int, cache_dir: Optional[str]
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, starts, ends, labels) of every example of the split."""
    info = task_info(data.task)
    stream = streams.materialized_stream(data, split, cache_dir)
    doc_starts = np.asarray(stream.doc_starts, np.int64)
    if info.windows == "all":
        starts, ends = packing.document_pieces(doc_starts, length)
        counts = -(-np.diff(doc_starts) // length)
        labels = np.repeat(stream.labels, counts)
    else:
        starts = doc_starts[:-1]
        ends = np.minimum(starts + length, doc_starts[1:])
        labels = np.asarray(stream.labels)
    keep = (labels >= 0) & (ends > starts)  # unlabelled (-1) examples are not scored
    if not keep.any():
        raise DataError(f"split {split!r} of task {data.task!r} has no labelled example")
    return stream.tokens, starts[keep], ends[keep], labels[keep].astype(np.int32)


def _rows(tokens: np.ndarray, starts: np.ndarray, ends: np.ndarray, labels: np.ndarray,
          length: int) -> Rows:
    inputs = packing.gather_pieces(tokens, starts, ends, length)
    return {"inputs": inputs, "segment_ids": (inputs != packing.PAD_ID).astype(np.int32),
            "label": labels.astype(np.int32)}


def classification_examples(data, *, length: int, split: str = "test",
                            max_examples: Optional[int] = None,
                            cache_dir: Optional[str] = None) -> Rows:
    """Every example of a split in corpus order (the first `max_examples`, spread evenly over
    the split when there are more)."""
    data = as_data_config(data)
    tokens, starts, ends, labels = _pieces(data, split, length, cache_dir)
    if max_examples is not None and len(starts) > max_examples:
        keep = np.linspace(0, len(starts) - 1, max_examples).round().astype(np.int64)
        starts, ends, labels = starts[keep], ends[keep], labels[keep]
    return _rows(tokens, starts, ends, labels, length)


def classification_batches(data, *, length: int, batch_size: int, seed: int = 0,
                           split: str = "train", start_step: int = 0, shard_index: int = 0,
                           num_shards: int = 1, cache_dir: Optional[str] = None
                           ) -> Iterator[Rows]:
    """This host's rows of global batch k, k = start_step, start_step + 1, ...: examples in an
    order reshuffled every epoch from `seed` (`packing.example_ids`)."""
    data = as_data_config(data)
    if batch_size % num_shards or not 0 <= shard_index < num_shards:
        raise DataError(f"need 0 <= shard_index < num_shards dividing batch_size; got "
                        f"{shard_index=}, {num_shards=}, {batch_size=}")
    tokens, starts, ends, labels = _pieces(data, split, length, cache_dir)
    per_host = batch_size // num_shards
    rows = slice(shard_index * per_host, (shard_index + 1) * per_host)
    for step in itertools.count(start_step):
        ids = packing.example_ids(step, batch_size, len(starts), seed=seed, rows=rows)
        yield _rows(tokens, starts[ids], ends[ids], labels[ids], length)


def class_counts(data, *, length: int, split: str = "test",
                 cache_dir: Optional[str] = None) -> np.ndarray:
    """int64 `[num_classes]`: examples of each class in the split (the majority baseline is
    `max / sum`)."""
    data = as_data_config(data)
    labels = _pieces(data, split, length, cache_dir)[3]
    return np.bincount(labels, minlength=task_info(data.task).num_classes)
