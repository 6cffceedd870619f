"""The data API the trainer and evaluator call: numpy batches, windows and bytes per token.

All functions take the run's `DataConfig` (its task, vocabulary and text-files glob), or a bare
registered task name (`lexjax.stdlib_code`, `lexjax.pg19`, ...; see `tasks.py`) meaning that task
with the byte vocabulary. They return numpy arrays only.

Local tasks (stdlib_code, text_files) are materialised as one flat token array per split and
cached on disk (see `streams.py`), which makes every batch a pure function of (seed, step): O(1)
resumption and hosts that read only their own rows. TFDS tasks are streamed (see `train_batches`).
"""
from __future__ import annotations

import itertools
from typing import Iterator, Union

import numpy as np
import seqio

from lexjax.data import packing, streams, tasks
from lexjax.data.config import DataConfig, as_data_config
from lexjax.data.errors import DataError

Data = Union[DataConfig, str]

#: Default examples held by the shuffle buffer of a streamed (TFDS) task, on top of seqio's
#: shuffling of documents; it breaks up runs of consecutive examples cut from one long document.
STREAM_SHUFFLE_BUFFER = 4096
#: Bytes of text (at least; whole documents) read to estimate `bytes_per_token` of a streamed task.
STREAM_BYTES_PER_TOKEN_SAMPLE = 4_000_000


def _host_rows(length: int, batch_size: int, seed: int, start_step: int, shard_index: int,
               num_shards: int) -> slice:
    """This host's rows of a global batch, after checking the batching arguments."""
    if length <= 0 or batch_size <= 0 or seed < 0 or start_step < 0:
        raise DataError(f"need length > 0, batch_size > 0, seed >= 0 and start_step >= 0; got "
                        f"{length=}, {batch_size=}, {seed=}, {start_step=}")
    if num_shards <= 0 or batch_size % num_shards or not 0 <= shard_index < num_shards:
        raise DataError(f"need 0 <= shard_index < num_shards dividing batch_size; got "
                        f"{shard_index=}, {num_shards=}, {batch_size=}")
    per_host = batch_size // num_shards
    return slice(shard_index * per_host, (shard_index + 1) * per_host)


def train_batches(data: Data, *, length: int, batch_size: int, seed: int = 0,
                  split: str = "train", start_step: int = 0, shard_index: int = 0,
                  num_shards: int = 1, shuffle: bool = True, pack: bool = True,
                  pad_left: bool = False, shuffle_buffer_size: int = STREAM_SHUFFLE_BUFFER,
                  cache_dir: str | None = None) -> Iterator[np.ndarray]:
    """Yields the training batches of a task forever, starting at global step `start_step`.

    Packed (default): the split's documents, each followed by EOS, are concatenated and cut into
    examples of `length` tokens; the packing is exact (every token appears once per epoch, except
    the final partial example of the stream, which is dropped); `packing.segment_ids` tells the
    documents of an example apart. Padded (`pack=False`, for models that cannot keep documents
    apart): each document (with its EOS) is cut into pieces of at most `length` tokens, and each
    piece is one example, padded with PAD (id 0) after it, or before it with `pad_left` (for
    models scored on a row's last positions). Global batch k holds `batch_size` examples;
    host `shard_index` of `num_shards` gets rows
    `[shard_index * b, (shard_index + 1) * b)` of it, b = batch_size // num_shards.

    Local tasks: the same examples every epoch, visited in an order reshuffled each epoch from
    `seed` (see `packing.py`); a batch may straddle two epochs. Batch k is computed directly, so
    `start_step=k` costs nothing and each host gathers only its own rows.

    Streamed (TFDS) tasks: documents are shuffled by seqio (seeded), packed, and the examples
    shuffled again in a buffer of `shuffle_buffer_size` examples; epochs run into each other
    without a break. Every host reads the whole stream and keeps its rows (so shards still
    partition the global batch exactly), and `start_step=k` skips k * batch_size examples.

    Args:
      data: the run's `DataConfig`, or a registered task name, e.g. "lexjax.stdlib_code".
      length: L, tokens per example.
      batch_size: global batch size B; a multiple of `num_shards`.
      seed: shuffling seed (>= 0); the same seed gives the same stream.
      split: the split to train on.
      start_step: the first global batch to yield.
      shard_index: this host's index in [0, num_shards).
      num_shards: number of hosts sharing each global batch.
      shuffle: shuffle examples (False: stream order, useful for inspection and tests).
      pack: packed examples (True) or padded document pieces (False).
      pad_left: padded pieces end at the row's end (padding first).
      shuffle_buffer_size: examples held for shuffling a streamed task (local tasks need none).
      cache_dir: cache root for local tasks; default as in `streams.cache_root`.

    Yields:
      `[batch_size // num_shards, length]` int32 token arrays.

    Raises:
      DataError: for an unknown task or split, an empty split, or one shorter than `length`.
    """
    rows = _host_rows(length, batch_size, seed, start_step, shard_index, num_shards)
    data, task, stream = _split_of(data, split, cache_dir)
    if stream is not None:
        if pack:
            starts = np.arange(stream.num_tokens // length, dtype=np.int64) * length
            ends = starts + length
        else:
            starts, ends = packing.document_pieces(stream.doc_starts, length)
        if len(starts) == 0:
            raise DataError(f"split {split!r} of task {data.task!r} has {stream.num_tokens} "
                            f"tokens, fewer than one example of length {length}")
        return _local_batches(stream.tokens, starts, ends, length, batch_size, seed, shuffle,
                              start_step, rows, pad_left)
    return _streamed_batches(task, split, length, batch_size, seed, shuffle, pack, pad_left,
                             shuffle_buffer_size, start_step, rows)


def _split_of(data: Data, split: str, cache_dir: str | None
              ) -> tuple[DataConfig, seqio.Task, streams.TokenStream | None]:
    """`data` as a DataConfig, its task (with `split` checked), and, for a local task, the
    split's materialised token stream (None for a streamed task)."""
    data = as_data_config(data)
    task = tasks.get_task(data)
    tasks.check_split(task, split)
    stream = (streams.materialized_stream(data, split, cache_dir) if tasks.is_local(data.task)
              else None)
    return data, task, stream


def _local_batches(tokens: np.ndarray, starts: np.ndarray, ends: np.ndarray, length: int,
                   batch_size: int, seed: int, shuffle: bool, start_step: int, rows: slice,
                   pad_left: bool) -> Iterator[np.ndarray]:
    for step in itertools.count(start_step):
        ids = packing.example_ids(step, batch_size, len(starts), seed=seed, shuffle=shuffle,
                                  rows=rows)
        yield packing.gather_pieces(tokens, starts[ids], ends[ids], length, pad_left=pad_left)


def _streamed_batches(task: seqio.Task, split: str, length: int, batch_size: int, seed: int,
                      shuffle: bool, pack: bool, pad_left: bool, shuffle_buffer_size: int,
                      start_step: int, rows: slice) -> Iterator[np.ndarray]:
    documents = (tokens for tokens, _ in streams.iter_documents(
        task, split, shuffle=shuffle, seed=seed, num_epochs=None))
    examples = (packing.pack_documents(documents, length) if pack
                else packing.pad_documents(documents, length, pad_left=pad_left))
    if shuffle:
        examples = packing.shuffle_buffer(examples, shuffle_buffer_size,
                                          np.random.default_rng([seed]))
    examples = itertools.islice(examples, start_step * batch_size, None)
    while True:
        batch = list(itertools.islice(examples, batch_size))
        if len(batch) < batch_size:
            raise DataError(f"split {split!r} of task {task.name!r} has too few tokens for a "
                            f"batch of {batch_size} examples of length {length}")
        yield np.stack(batch[rows])


def _local_stream(data: DataConfig, split: str, cache_dir) -> streams.TokenStream:
    if not tasks.is_local(data.task):
        raise DataError(
            f"training that carries state across steps reads each batch row from one stream, "
            f"which needs a local task; {data.task!r} is streamed from TFDS. Use "
            "lexjax.stdlib_code or lexjax.text_files (export the corpus to text files), or a "
            "stateless model")
    return streams.materialized_stream(data, split, cache_dir)


def stream_segments(data: Data, *, length: int, batch_size: int, split: str = "train",
                    cache_dir: str | None = None) -> int:
    """E, the segments per row stream of `stream_batches` (rows restart a stream at every
    multiple of E steps). Raises DataError if the split has fewer than `batch_size * length`
    tokens."""
    return _row_streams(as_data_config(data), split, length, batch_size, cache_dir)[1]


def _row_streams(data: DataConfig, split: str, length: int, batch_size: int,
                 cache_dir: str | None) -> tuple[streams.TokenStream, int]:
    """The split's token stream and E, its segments per row stream."""
    tasks.check_split(tasks.get_task(data), split)
    stream = _local_stream(data, split, cache_dir)
    segments = packing.segments_per_stream(stream.num_tokens, batch_size, length)
    if segments == 0:
        raise DataError(f"split {split!r} of task {data.task!r} has {stream.num_tokens} tokens, "
                        f"fewer than one segment of {length} for each of {batch_size} rows")
    return stream, segments


def stream_batches(data: Data, *, length: int, batch_size: int, seed: int = 0,
                   split: str = "train", start_step: int = 0, shard_index: int = 0,
                   num_shards: int = 1, shuffle: bool = True, cache_dir: str | None = None
                   ) -> Iterator[np.ndarray]:
    """Training batches whose rows are consecutive segments of one stream each (for models that
    carry state from step to step: Block-Recurrent Transformer, Transformer-XL).

    The split's token stream (documents joined by EOS) is cut into `batch_size` row streams of
    E * `length` tokens (`stream_segments`); batch k row i is segment k % E of the stream that
    epoch k // E assigns to row i (a seeded permutation per epoch). Every batch is computed
    directly from (seed, step), so resuming costs nothing, and host `shard_index` gathers only
    its rows. Local tasks only.

    Yields:
      `[batch_size // num_shards, length]` int32 token arrays.
    """
    rows = _host_rows(length, batch_size, seed, start_step, shard_index, num_shards)
    stream, segments = _row_streams(as_data_config(data), split, length, batch_size, cache_dir)
    return _row_batches(stream.tokens, segments, length, batch_size, seed, shuffle, start_step,
                        rows)


def _row_batches(tokens: np.ndarray, segments: int, length: int, batch_size: int, seed: int,
                 shuffle: bool, start_step: int, rows: slice) -> Iterator[np.ndarray]:
    for step in itertools.count(start_step):
        starts = packing.stream_segment_starts(step, batch_size, segments, length, seed=seed,
                                               shuffle=shuffle, rows=rows)
        yield packing.slices(tokens, starts, length)


def eval_windows(data: Data, *, length: int, split: str = "test",
                 max_windows: int | None = None, respect_documents: bool = False,
                 cache_dir: str | None = None) -> np.ndarray:
    """Non-overlapping evaluation windows of a split, deterministic, in corpus order.

    With `respect_documents=False` the split is one stream (documents in corpus order, each
    followed by EOS) cut into consecutive windows of `length` tokens, as in the ALiBi paper's
    non-overlapping evaluation: a window may span the end of one document and the start of the
    next. With `respect_documents=True` each document (with its EOS) is cut separately, from its
    first token; windows never cross a document boundary, and documents shorter than `length`
    give none. Either way a partial final window is dropped.

    Args:
      data: the run's `DataConfig`, or a registered task name.
      length: L, tokens per window.
      split: the split to evaluate ("test" by default).
      max_windows: keep only the first this many windows (None: all).
      respect_documents: whether windows may cross document boundaries (see above).
      cache_dir: cache root for local tasks.

    Returns:
      `[num_windows, length]` int32 tokens, num_windows >= 1.

    Raises:
      DataError: for an unknown task or split, or a split too short for one window.
    """
    if length <= 0 or (max_windows is not None and max_windows <= 0):
        raise DataError(f"need length > 0 and max_windows > 0 or None; got {length=}, "
                        f"{max_windows=}")
    data, task, stream = _split_of(data, split, cache_dir)
    if stream is not None:
        if respect_documents:
            windows = packing.document_windows(stream.tokens, stream.doc_starts, length,
                                               max_windows)
        else:
            windows = packing.stream_windows(stream.tokens, length, max_windows)
    else:
        windows = _streamed_windows(task, split, length, max_windows, respect_documents)
    if windows.shape[0] == 0:
        kind = "documents of at least" if respect_documents else "a stream of at least"
        raise DataError(f"split {split!r} of task {data.task!r} has no window: it lacks "
                        f"{kind} {length} tokens")
    return windows


def _streamed_windows(task: seqio.Task, split: str, length: int, max_windows: int | None,
                      respect_documents: bool) -> np.ndarray:
    documents = (tokens for tokens, _ in streams.iter_documents(task, split))
    if respect_documents:
        windows = (window for document in documents for window in packing.document_windows(
            document, np.array([0, document.shape[0]]), length))
    else:
        windows = packing.pack_documents(documents, length)
    rows = list(itertools.islice(windows, max_windows))
    return np.stack(rows) if rows else np.zeros([0, length], np.int32)


def bytes_per_token(data: Data, split: str = "test", *, cache_dir: str | None = None
                    ) -> float:
    """UTF-8 bytes of text per token, to turn a loss per token into bits per byte.

    bits/byte = (mean loss per token in nats) / ln(2) / bytes_per_token. EOS tokens are not
    counted, so the byte vocabulary gives exactly 1.0. For other vocabularies: the split's text
    bytes over its non-EOS tokens (for streamed tasks, over its first documents, until they hold
    `STREAM_BYTES_PER_TOKEN_SAMPLE` bytes). The text is the documents' own text, which the
    lossless SentencePiece models of `train_sentencepiece` decode back exactly.
    """
    data = as_data_config(data)
    if data.vocabulary == "byte":
        tasks.check_split(tasks.get_task(data), split)
        return 1.0
    data, task, stream = _split_of(data, split, cache_dir)
    if stream is not None:
        text_bytes, num_tokens = stream.text_bytes, stream.num_tokens - stream.num_documents
    else:
        text_bytes = num_tokens = 0
        for tokens, text in streams.iter_documents(task, split):
            text_bytes += len(text)
            num_tokens += tokens.shape[0] - 1
            if text_bytes >= STREAM_BYTES_PER_TOKEN_SAMPLE:
                break
    if num_tokens == 0:
        raise DataError(f"split {split!r} of task {data.task!r} has no text tokens")
    return text_bytes / num_tokens
