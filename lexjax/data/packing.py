"""Pure numpy functions that cut token streams into training examples and evaluation windows.

Training examples (fairseq's "token blocks", as used by the ALiBi paper): the split's documents,
each followed by EOS, form one stream of N tokens, cut into M = N // L examples of L tokens; the
last N % L tokens (the final partial example) are dropped. Epoch e visits the M examples in the
order `epoch_order(M, seed, e)`, and the infinite sequence of examples of all epochs is cut into
global batches of B rows, so global batch k holds sequence positions [k * B, (k + 1) * B) and may
straddle two epochs. Everything is a function of (k, seed), which makes resuming at step k O(1).

Packed examples hold several documents (or pieces of them); `segment_ids` tells them apart from
the EOS tokens, so a model that keeps documents apart attends within each one. Models that cannot
(their layers mix the whole row) train on padded examples instead: each document cut into pieces
of at most L tokens, each piece one example padded with PAD (`document_pieces`, `pad_documents`).

Evaluation windows are non-overlapping slices of L tokens, either of the whole stream or of each
document separately (see `stream_windows` and `document_windows`).
"""
from __future__ import annotations

import functools
from typing import Iterable, Iterator

import numpy as np

#: The padding (and BOS) id and the end-of-document id of every lexjax vocabulary.
PAD_ID = 0
EOS_ID = 1


def segment_ids(tokens: np.ndarray, eos_id: int = EOS_ID, pad_id: int = PAD_ID) -> np.ndarray:
    """int32 segment ids of examples `[..., length]`: 1 for the first document (piece) of a row,
    one more after every EOS, and 0 for padding."""
    tokens = np.asarray(tokens)
    eos = tokens == eos_id
    ids = 1 + np.cumsum(eos, axis=-1) - eos  # EOS belongs to the document it ends
    return np.where(tokens == pad_id, 0, ids).astype(np.int32)


def document_pieces(doc_starts: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """`(starts, ends)` int64 `[P]`: every document `[doc_starts[i], doc_starts[i + 1])` cut into
    consecutive pieces of `length` tokens, the last one of each document shorter (kept)."""
    doc_starts = np.asarray(doc_starts, dtype=np.int64)
    sizes = np.diff(doc_starts)
    counts = -(-sizes // length)
    first = np.cumsum(counts) - counts
    rank = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(first, counts)
    starts = np.repeat(doc_starts[:-1], counts) + rank * length
    ends = np.minimum(starts + length, np.repeat(doc_starts[1:], counts))
    return starts, ends


def gather_pieces(tokens: np.ndarray, starts: np.ndarray, ends: np.ndarray, length: int,
                  pad_id: int = PAD_ID, pad_left: bool = False) -> np.ndarray:
    """`[len(starts), length]` int32: row i is `tokens[starts[i]:ends[i]]` padded with `pad_id`
    after it (or before it, `pad_left`)."""
    starts = np.asarray(starts, dtype=np.int64)[:, None]
    ends = np.asarray(ends, dtype=np.int64)[:, None]
    first = ends - length if pad_left else starts
    offsets = first + np.arange(length, dtype=np.int64)
    inside = (offsets >= starts) & (offsets < ends)
    rows = np.asarray(tokens[np.where(inside, offsets, 0)], dtype=np.int32)
    return np.where(inside, rows, pad_id).astype(np.int32)


def pad_documents(documents: Iterable[np.ndarray], length: int, pad_id: int = PAD_ID,
                  pad_left: bool = False) -> Iterator[np.ndarray]:
    """The streaming counterpart of `document_pieces`: each document cut into `[length]` int32
    pieces, the last one of each padded with `pad_id` (before it with `pad_left`)."""
    for document in documents:
        for start in range(0, document.shape[0], length):
            piece = np.asarray(document[start:start + length], dtype=np.int32)
            pad = (length - piece.shape[0], 0) if pad_left else (0, length - piece.shape[0])
            yield np.pad(piece, pad, constant_values=pad_id)


def random_left_crops(rows: np.ndarray, minimum_length: int, uniforms: np.ndarray,
                      pad_id: int = PAD_ID) -> np.ndarray:
    """Random prefixes of left-padded rows `[batch, length]` (Perceiver AR's training crops):
    row i, whose last r_i positions hold its tokens, keeps its first e_i tokens, e_i uniform in
    [min(max(minimum_length, 1), r_i), r_i] (drawn from `uniforms [batch]` in [0, 1), one per
    row, so a row's crop does not depend on how the batch is split across hosts), moved to the
    row's end (padding first again): the positions a model reads at a row's end are drawn from
    all of the piece's positions."""
    rows = np.asarray(rows)
    batch, length = rows.shape
    real = rows != pad_id
    counts = np.where(real.any(axis=1), length - np.argmax(real, axis=1), 0)
    low = np.minimum(max(minimum_length, 1), counts)
    ends = np.minimum(low + np.floor(np.asarray(uniforms) * (counts - low + 1)).astype(int),
                      counts)
    out = np.full_like(rows, pad_id)
    for i in range(batch):
        kept = rows[i, length - counts[i]:length - counts[i] + ends[i]]
        out[i, length - ends[i]:] = kept
    return out


@functools.lru_cache(maxsize=4)
def epoch_order(num_examples: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """`[num_examples]` int64: the order in which epoch `epoch` visits the examples (read-only).

    A permutation drawn from numpy's PCG64 seeded with (seed, epoch); the identity when not
    `shuffle`.
    """
    if shuffle:
        order = np.random.default_rng([seed, epoch]).permutation(num_examples)
    else:
        order = np.arange(num_examples, dtype=np.int64)
    order.setflags(write=False)
    return order


def example_ids(step: int, batch_size: int, num_examples: int, *, seed: int,
                shuffle: bool = True, rows: slice = slice(None)) -> np.ndarray:
    """Indices into the M = `num_examples` examples of global batch `step`'s `rows`.

    Args:
      step: the global batch index k >= 0.
      batch_size: B, rows of a global batch.
      num_examples: M, examples in one epoch.
      seed: the shuffling seed.
      shuffle: visit examples in a seeded random order each epoch (else in stream order).
      rows: which rows of the global batch to compute (a host's share).

    Returns:
      `[len(range(B)[rows])]` int64 example indices in [0, M).
    """
    positions = step * batch_size + np.arange(batch_size, dtype=np.int64)[rows]
    epochs, within = np.divmod(positions, num_examples)
    ids = np.empty_like(positions)
    for epoch in np.unique(epochs):
        mask = epochs == epoch
        ids[mask] = epoch_order(num_examples, seed, int(epoch), shuffle)[within[mask]]
    return ids


def segments_per_stream(num_tokens: int, batch_size: int, length: int) -> int:
    """E: consecutive segments of `length` tokens each of the `batch_size` row streams holds.

    For training that carries state across steps (Block-Recurrent Transformer, Transformer-XL),
    the stream of N tokens is cut into B row streams of E * L tokens (the tail of N - B * E * L
    tokens is dropped); every row reads its stream segment after segment, so all rows start a new
    stream at the same steps (multiples of E).
    """
    return num_tokens // batch_size // length


def stream_segment_starts(step: int, batch_size: int, segments: int, length: int, *, seed: int,
                          shuffle: bool = True, rows: slice = slice(None)) -> np.ndarray:
    """Start offsets of global batch `step`'s `rows` in the row-stream layout.

    Epoch e = step // E assigns the B row streams to the rows in the order
    `epoch_order(B, seed, e)`; within the epoch, batch k = step % E reads segment k of each
    stream. Row i of batch k therefore continues row i of batch k - 1 unless k % E == 0.

    Returns:
      `[len(range(B)[rows])]` int64 offsets into the token stream.
    """
    epoch, within = divmod(step, segments)
    streams = epoch_order(batch_size, seed, epoch, shuffle)[rows]
    return streams * (segments * length) + within * length


def slices(tokens: np.ndarray, starts: np.ndarray, length: int) -> np.ndarray:
    """`[len(starts), length]` int32: row i is `tokens[starts[i]:starts[i] + length]`."""
    offsets = np.asarray(starts, dtype=np.int64)[:, None] + np.arange(length, dtype=np.int64)
    return np.asarray(tokens[offsets], dtype=np.int32).reshape(len(starts), length)


def pack_documents(documents: Iterable[np.ndarray], length: int) -> Iterator[np.ndarray]:
    """Concatenates a stream of documents and yields it cut into `[length]` int32 examples.

    The streaming counterpart of cutting a flat array: the examples, concatenated, are exactly the
    concatenated documents without their last `total % length` tokens.
    """
    pending: list[np.ndarray] = []
    num_pending = 0
    for document in documents:
        pending.append(document)
        num_pending += document.shape[0]
        if num_pending < length:
            continue
        flat = np.concatenate(pending).astype(np.int32, copy=False)
        num_full = num_pending // length
        yield from flat[:num_full * length].reshape(num_full, length)
        pending, num_pending = [flat[num_full * length:]], num_pending - num_full * length


def shuffle_buffer(items: Iterable[np.ndarray], size: int, rng: np.random.Generator
                   ) -> Iterator[np.ndarray]:
    """Yields `items` in a random order, holding at most `size` of them at once.

    Each new item replaces a uniformly chosen item of a full buffer, which is yielded; at the end
    the rest are yielded in random order. Deterministic given `rng`'s state.
    """
    buffer: list[np.ndarray] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = int(rng.integers(size))
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer


def stream_windows(tokens: np.ndarray, length: int, max_windows: int | None = None
                   ) -> np.ndarray:
    """`[n, length]` int32: the stream cut into consecutive non-overlapping windows.

    n = len(tokens) // length, capped at `max_windows`; the partial tail is dropped.
    """
    n = tokens.shape[0] // length
    if max_windows is not None:
        n = min(n, max_windows)
    return np.asarray(tokens[:n * length], dtype=np.int32).reshape(n, length)


def document_windows(tokens: np.ndarray, doc_starts: np.ndarray, length: int,
                     max_windows: int | None = None) -> np.ndarray:
    """`[n, length]` int32: non-overlapping windows that never cross a document boundary.

    Each document `tokens[doc_starts[i]:doc_starts[i + 1]]` (its EOS included) gives the windows
    starting at its first token, `len // length` of them; its partial tail is dropped, so documents
    shorter than `length` give none. Windows are in document order, capped at `max_windows`.
    """
    doc_starts = np.asarray(doc_starts, dtype=np.int64)
    counts = np.diff(doc_starts) // length
    first = np.cumsum(counts) - counts  # Index of each document's first window.
    window_doc_start = np.repeat(doc_starts[:-1], counts)
    window_rank = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(first, counts)
    starts = window_doc_start + window_rank * length
    if max_windows is not None:
        starts = starts[:max_windows]
    return slices(tokens, starts, length)
