"""Vocabularies: byte-level (the default) and SentencePiece (`DataConfig.vocabulary`).

The byte vocabulary is `seqio.ByteVocabulary()`: id 0 is padding, 1 is EOS, 2 is UNK, and byte `b`
is id `b + 3`, so its size is 259 and any text (any bytes, in fact) encodes losslessly.

A SentencePiece vocabulary wraps a model trained by `python -m lexjax.data.train_sentencepiece`,
which uses the same special ids (pad 0, EOS 1, UNK 2, no BOS).

A run selects one in its `lexjax.data.DataConfig` (`configs/data/sentencepiece.gin` does so from a
`SENTENCEPIECE_MODEL` macro).
"""
from __future__ import annotations

import functools
import hashlib
import os

import numpy as np
import seqio

from lexjax.data.errors import DataError
from lexjax.objectives.masking import CONTINUES_WORD, IN_WORD

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
            "--out=PATH` and set SENTENCEPIECE_MODEL (configs/data/sentencepiece.gin) to PATH")
    stat = os.stat(model_path)
    return _cached_sentencepiece(os.path.realpath(model_path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _cached_sentencepiece(path: str, size: int, mtime_ns: int) -> seqio.SentencePieceVocabulary:
    del size, mtime_ns  # Only part of the cache key.
    return seqio.SentencePieceVocabulary(path)


def get_vocabulary(kind: str = "byte", sentencepiece_model: str | None = None
                   ) -> seqio.Vocabulary:
    """The vocabulary of a kind.

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
            raise DataError("vocabulary kind 'sentencepiece' needs a model file: set "
                            "SENTENCEPIECE_MODEL with configs/data/sentencepiece.gin")
        return sentencepiece_vocabulary(sentencepiece_model)
    raise DataError(f"unknown vocabulary kind {kind!r}; use one of {VOCABULARY_KINDS}")


def vocab_size(vocabulary: seqio.Vocabulary | None = None) -> int:
    """Number of token ids of `vocabulary` (default: bytes); 259 for bytes."""
    return int((vocabulary or byte_vocabulary()).vocab_size)


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


def word_roles(vocabulary: seqio.Vocabulary) -> np.ndarray:
    """int8 `[vocab_size]`: each id's role in words, for whole-word masking: `IN_WORD` (a word
    may go on after it) | `CONTINUES_WORD` (it joins the word of the token before it, when that
    one is `IN_WORD`).

    Bytes: letters, digits, `_` and the bytes of multi-byte UTF-8 characters (>= 0x80) have
    both bits; every other byte neither (words are runs of word bytes). SentencePiece: a piece
    with a leading "▁" starts a word (`IN_WORD`), any other normal piece continues one (both
    bits); control and unknown pieces have neither.
    """
    size = vocab_size(vocabulary)
    roles = np.zeros(size, np.int8)
    if isinstance(vocabulary, seqio.ByteVocabulary):
        for byte in range(256):
            char = chr(byte)
            if byte >= 0x80 or char == "_" or (char.isascii() and char.isalnum()):
                roles[byte + 3] = IN_WORD | CONTINUES_WORD
        return roles
    if isinstance(vocabulary, seqio.SentencePieceVocabulary):
        processor = vocabulary.tokenizer
        for i in range(min(size, processor.get_piece_size())):
            if processor.is_control(i) or processor.is_unknown(i):
                continue
            starts = processor.id_to_piece(i).startswith("\u2581")
            roles[i] = IN_WORD if starts else IN_WORD | CONTINUES_WORD
        return roles
    raise DataError(f"whole-word masking does not know the words of {vocabulary!r}")
