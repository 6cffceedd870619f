r"""Trains a SentencePiece model on a task's training text.

    python -m lexjax.data.train_sentencepiece --task=lexjax.stdlib_code --vocab_size=8000 \
        --out=/tmp/stdlib_8k.model

then select it with `configs/data/sentencepiece.gin` (`--gin.SENTENCEPIECE_MODEL=PATH`), which
sets the run's `lexjax.data.DataConfig`.

To stay fast, training reads at most `--max_chars` characters (10 million by default) of documents
drawn in a seeded shuffled order, cut at line boundaries into chunks of at most 2,000 characters
that keep their newlines, so pieces can span line ends and indentation.

The model is lossless on any text: no normalization ("identity"), whitespace kept as is, no dummy
prefix, and byte fallback (so `vocab_size` must exceed 259 plus the distinct characters kept). It
uses T5's special ids, like the byte vocabulary: pad 0, EOS 1, UNK 2, no BOS.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
from typing import Iterable, Iterator, Sequence

import sentencepiece as spm
from absl import logging

from lexjax.data import streams, tasks
from lexjax.data.config import DataConfig, as_data_config
from lexjax.data.errors import DataError

DEFAULT_MAX_CHARS = 10_000_000
CHUNK_CHARS = 2000


def _chunks(text: str, chunk_chars: int) -> Iterator[str]:
    """`text` cut into pieces of at most `chunk_chars` characters, at line ends where possible."""
    current = ""
    for line in text.splitlines(keepends=True):
        while len(line) > chunk_chars:  # A line too long for one chunk is cut anywhere.
            if current:
                yield current
                current = ""
            yield line[:chunk_chars]
            line = line[chunk_chars:]
        if len(current) + len(line) > chunk_chars:
            yield current
            current = ""
        current += line
    if current:
        yield current


def training_chunks(texts: Iterable[str], max_chars: int, chunk_chars: int = CHUNK_CHARS
                    ) -> Iterator[str]:
    """The chunks of `texts` (see `_chunks`) up to `max_chars` characters in all."""
    budget = max_chars
    for text in texts:
        for chunk in _chunks(text, chunk_chars):
            if budget <= 0:
                return
            chunk = chunk[:budget]
            budget -= len(chunk)
            yield chunk


@contextlib.contextmanager
def _absl_verbosity(level: int):
    previous = logging.get_verbosity()
    logging.set_verbosity(level)
    try:
        yield
    finally:
        logging.set_verbosity(previous)


def task_texts(data: DataConfig | str, split: str = "train", seed: int = 0) -> Iterator[str]:
    """The documents of a task's split as text, in a shuffled order fixed by `seed`."""
    data = as_data_config(data)
    task = tasks.get_task(DataConfig(task=data.task, text_files_glob=data.text_files_glob))
    # seqio warns that shuffling an uncached FunctionDataSource is unfit for training a model;
    # here it only samples text for the tokenizer.
    with _absl_verbosity(logging.ERROR):
        documents = streams.iter_documents(task, split, shuffle=True, seed=seed)
    return (text.decode("utf-8", errors="replace") for _, text in documents)


def train_sentencepiece(data: DataConfig | str, *, vocab_size: int, out: str,
                        split: str = "train", max_chars: int = DEFAULT_MAX_CHARS,
                        model_type: str = "unigram", seed: int = 0) -> str:
    """Trains a SentencePiece model on up to `max_chars` characters of a task's split.

    Args:
      data: a registered task, e.g. "lexjax.stdlib_code", or a `DataConfig` (for a text-files
        glob; its vocabulary is not used).
      vocab_size: number of pieces, specials and the 256 byte-fallback pieces included.
      out: path of the `.model` file to write (parent directories are created).
      split: the split to read.
      max_chars: characters of text to train on at most.
      model_type: "unigram" or "bpe".
      seed: order in which documents are drawn.

    Returns:
      `out`.
    """
    data = as_data_config(data)
    chunks = training_chunks(task_texts(data, split, seed), max_chars)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=chunks, model_writer=model, vocab_size=vocab_size,
            model_type=model_type, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=False, byte_fallback=True, split_digits=True,
            allow_whitespace_only_pieces=True, character_coverage=1.0,
            max_sentence_length=4 * CHUNK_CHARS, num_threads=os.cpu_count() or 1, minloglevel=2)
    except RuntimeError as e:
        raise DataError(f"SentencePiece training on {data.task!r} failed: {e}") from e
    directory = os.path.dirname(os.path.abspath(out))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    with os.fdopen(fd, "wb") as f:
        f.write(model.getvalue())
    os.replace(tmp, out)
    return out


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lexjax.data.train_sentencepiece",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", required=True, help="task name, e.g. lexjax.stdlib_code")
    parser.add_argument("--vocab_size", type=int, required=True)
    parser.add_argument("--out", required=True, help="path of the .model file to write")
    parser.add_argument("--split", default="train")
    parser.add_argument("--max_chars", type=int, default=DEFAULT_MAX_CHARS)
    parser.add_argument("--model_type", default="unigram", choices=("unigram", "bpe"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--text_files_glob", help="glob of the lexjax.text_files task")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    try:
        data = DataConfig(task=args.task, text_files_glob=args.text_files_glob)
        path = train_sentencepiece(data, vocab_size=args.vocab_size, out=args.out,
                                   split=args.split, max_chars=args.max_chars,
                                   model_type=args.model_type, seed=args.seed)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {path} ({args.vocab_size} pieces, task {args.task}, split {args.split})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
