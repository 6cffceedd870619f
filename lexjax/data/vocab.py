"""Vocabularies: byte-level (the default) and SentencePiece, chosen by gin.

The byte vocabulary is `seqio.ByteVocabulary()`: id 0 is padding, 1 is EOS, 2 is UNK, and byte `b`
is id `b + 3`, so its size is 259 and any text (any bytes, in fact) encodes losslessly.

A SentencePiece vocabulary wraps a model trained by `python -m lexjax.data.train_sentencepiece`,
which uses the same special ids (pad 0, EOS 1, UNK 2, no BOS).

Select one with gin, e.g.::

    lexjax.data.vocabulary.kind = "sentencepiece"
    lexjax.data.vocabulary.sentencepiece_model = "/path/to/spm.model"

(`configs/data/sentencepiece.gin` does this from a `SENTENCEPIECE_MODEL` macro.)
"""
from __future__ import annotations

import functools
import hashlib
import os

import gin
import seqio

from lexjax.data.errors import DataError

BYTE_VOCAB_SIZE = 259
VOCABULARY_KINDS = ("byte", "sentencepiece")


def byte_vocabulary() -> seqio.ByteVocabulary:
    """The byte-level vocabulary: 259 ids (pad 0, EOS 1, UNK 2, byte b -> b + 3)."""
    return seqio.ByteVocabulary()


def sentencepiece_vocabulary(model_path: str) -> seqio.SentencePieceVocabulary:
    """The SentencePiece vocabulary of the model file at `model_path`.

    The same file (same path, size and modification time) always gives the same object, so its
    TensorFlow tokenizer is built once per process.
    """
    if not os.path.isfile(model_path):
        raise DataError(
            f"SentencePiece model not found: {model_path!r}; train one with `python -m "
            "lexjax.data.train_sentencepiece --task=lexjax.stdlib_code --vocab_size=8000 "
            "--out=PATH` and bind lexjax.data.vocabulary.sentencepiece_model to PATH")
    stat = os.stat(model_path)
    return _cached_sentencepiece(os.path.realpath(model_path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _cached_sentencepiece(path: str, size: int, mtime_ns: int) -> seqio.SentencePieceVocabulary:
    del size, mtime_ns  # Only part of the cache key.
    return seqio.SentencePieceVocabulary(path)


@gin.configurable("vocabulary", module="lexjax.data")
def get_vocabulary(kind: str = "byte", sentencepiece_model: str | None = None
                   ) -> seqio.Vocabulary:
    """The vocabulary selected by gin (`lexjax.data.vocabulary.*`) or by the arguments.

    Args:
      kind: "byte" (default) or "sentencepiece".
      sentencepiece_model: path of a SentencePiece model file; required for "sentencepiece".

    Returns:
      A `seqio.Vocabulary`; `vocabulary.vocab_size` is its number of ids (259 for bytes).
    """
    if kind == "byte":
        return byte_vocabulary()
    if kind == "sentencepiece":
        if not sentencepiece_model:
            raise DataError(
                "vocabulary kind 'sentencepiece' needs a model file: bind "
                "lexjax.data.vocabulary.sentencepiece_model = '/path/to/spm.model'")
        return sentencepiece_vocabulary(sentencepiece_model)
    raise DataError(f"unknown vocabulary kind {kind!r}; use one of {VOCABULARY_KINDS}")


def resolve_vocabulary(vocabulary: seqio.Vocabulary | None) -> seqio.Vocabulary:
    """`vocabulary` itself, or the gin-configured one when it is None."""
    return get_vocabulary() if vocabulary is None else vocabulary


def vocab_size(vocabulary: seqio.Vocabulary | None = None) -> int:
    """Number of token ids of `vocabulary` (default: the gin-configured one); 259 for bytes."""
    return int(resolve_vocabulary(vocabulary).vocab_size)


def vocabulary_id(vocabulary: seqio.Vocabulary) -> str:
    """A short name that changes whenever the token ids of a text would: keys caches and tasks.

    Returns "byte" for the byte vocabulary and "spm_<12 hex digits of the model's md5>" for a
    SentencePiece model, so retraining a model at the same path never reuses stale tokens.
    """
    if isinstance(vocabulary, seqio.ByteVocabulary):
        extra = vocabulary.extra_ids
        return "byte" if not extra else f"byte_x{extra}"
    if isinstance(vocabulary, seqio.SentencePieceVocabulary):
        digest = hashlib.md5(vocabulary.sp_model).hexdigest()[:12]
        extra = vocabulary.extra_ids
        return f"spm_{digest}" if not extra else f"spm_{digest}_x{extra}"
    raise DataError(
        f"unsupported vocabulary {vocabulary!r}; lexjax.data handles seqio.ByteVocabulary and "
        "seqio.SentencePieceVocabulary")
