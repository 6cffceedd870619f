"""Vocabularies: byte-level (the default), SentencePiece and a `tokenizer.json`
(`DataConfig.vocabulary`).

The byte vocabulary is `seqio.ByteVocabulary()`: id 0 is padding, 1 is EOS, 2 is UNK, and byte `b`
is id `b + 3`, so its size is 259 and any text (any bytes, in fact) encodes losslessly.

A SentencePiece vocabulary wraps a model trained by `python -m lexjax.data.train_sentencepiece`,
which uses the same special ids (pad 0, EOS 1, UNK 2, no BOS).

A tokenizer.json vocabulary (`TokenizerJsonVocabulary`) wraps the file of the `tokenizers`
library that a Hugging Face checkpoint ships (byte-level BPE, WordPiece or Unigram), so a run
converted from one tokenizes as the checkpoint did. Its ids are the file's own: EOS and UNK are
the tokens that a `tokenizer_config.json` beside the file names (`eos_token`, `unk_token`), else
the first of the usual names ("</s>", "<|endoftext|>", "<eos>", "[SEP]"; "<unk>", "[UNK]") the
tokenizer knows, else none. seqio pads with id 0, which in such a file is an ordinary token
(often "!" or "[PAD]"): decoding stops at EOS, so padding after it never shows. Text is encoded
without the special tokens (BOS, [CLS], ...) that the file's post-processor would add, and
decoded without special tokens. It needs the `tokenizers` package (`pip install -e '.[convert]'`).

A run selects one in its `lexjax.data.DataConfig` (`configs/data/sentencepiece.gin` does so from a
`SENTENCEPIECE_MODEL` macro; `DataConfig.tokenizer_file` names a tokenizer.json).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from typing import Any, Iterable, Optional

import numpy as np
import seqio
import tensorflow as tf

from lexjax.data.errors import DataError
from lexjax.objectives.masking import CONTINUES_WORD, IN_WORD

BYTE_VOCAB_SIZE = 259
VOCABULARY_KINDS = ("byte", "sentencepiece", "tokenizer_json")

#: Tokens taken for EOS and UNK, in order, when no tokenizer_config.json names them.
EOS_TOKENS = ("</s>", "<|endoftext|>", "<eos>", "[SEP]")
UNK_TOKENS = ("<unk>", "[UNK]")
#: The word-start mark of SentencePiece-style (Metaspace) pieces.
METASPACE = "\u2581"
#: A byte-fallback piece (SentencePiece-style BPE, e.g. Llama 2): one byte, "<0xE2>".
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


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


class TokenizerJsonVocabulary(seqio.Vocabulary):
    """The vocabulary of a `tokenizers` file (a Hugging Face checkpoint's tokenizer.json).

    See the module docstring for its special ids. The file's truncation and padding settings are
    dropped: every text is encoded whole.

    Attributes:
      path: the tokenizer.json.
      digest: the md5 (hex) of its bytes and its EOS id (`vocabulary_id`).
    """

    def __init__(self, path: str):
        try:
            import tokenizers
        except ImportError:
            raise DataError("a tokenizer.json vocabulary needs the tokenizers package: "
                            "`pip install -e '.[convert]'` or `pip install tokenizers`") from None
        if not os.path.isfile(path):
            raise DataError(f"tokenizer file not found: {path!r} "
                            "(lexjax.data.DataConfig.tokenizer_file)")
        with open(path, "rb") as f:
            data = f.read()
        try:
            self._tokenizer = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
        except Exception as err:  # `tokenizers` raises plain Exceptions.
            raise DataError(f"cannot read tokenizer file {path!r}: {err}") from err
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        self.path = path
        config_path = os.path.join(os.path.dirname(path), "tokenizer_config.json")
        config = _tokenizer_config(config_path)
        self._eos_id = _special_id(self._tokenizer, config, "eos_token", EOS_TOKENS, config_path)
        self._unk_id = _special_id(self._tokenizer, config, "unk_token", UNK_TOKENS, config_path)
        self.digest = hashlib.md5(data + f"\0eos={self._eos_id}".encode()).hexdigest()
        self._size = max(self._tokenizer.get_vocab(with_added_tokens=True).values(),
                         default=-1) + 1
        super().__init__()

    @property
    def tokenizer(self) -> Any:
        """The `tokenizers.Tokenizer`."""
        return self._tokenizer

    @property
    def eos_id(self) -> Optional[int]:
        return self._eos_id

    @property
    def unk_id(self) -> Optional[int]:
        return self._unk_id

    @property
    def _base_vocab_size(self) -> int:
        """One more than the largest id, added tokens included."""
        return self._size

    def _encode(self, s: str | bytes) -> list[int]:
        if isinstance(s, bytes):
            s = s.decode("utf-8", errors="replace")
        return self._tokenizer.encode(s, add_special_tokens=False).ids

    def _decode(self, ids: Iterable[int]) -> str:
        """The text of `ids` up to the first EOS, special tokens left out."""
        ids = [int(i) for i in ids]
        if self._eos_id in ids:
            ids = ids[:ids.index(self._eos_id)]
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
        """int32 ids of a string tensor: `[n]` for a scalar, else ragged `s.shape + [None]`."""
        s = tf.convert_to_tensor(s, tf.string)
        values, lengths = tf.numpy_function(self._encode_strings, [tf.reshape(s, [-1])],
                                            [tf.int32, tf.int64], stateful=False)
        values.set_shape([None])
        if s.shape.rank == 0:
            return values
        ids = tf.RaggedTensor.from_row_lengths(values, tf.ensure_shape(lengths, [None]))
        for size in reversed(tf.unstack(tf.shape(s, tf.int64)[1:], num=s.shape.rank - 1)):
            ids = tf.RaggedTensor.from_uniform_row_length(ids, size)
        return ids

    def _decode_tf(self, ids: tf.Tensor | tf.RaggedTensor) -> tf.Tensor | tf.RaggedTensor:
        """Strings of the rows (last axis) of dense or ragged ids: the shape less its last axis."""
        if isinstance(ids, tf.RaggedTensor):
            if ids.flat_values.shape.rank != 1:
                return ids.with_flat_values(self._decode_tf(ids.flat_values))
            strings = self._decode_rows_tf(ids.flat_values, ids.nested_row_splits[-1])
            outer = ids.nested_row_splits[:-1]
            return tf.RaggedTensor.from_nested_row_splits(strings, outer) if outer else strings
        ids = tf.convert_to_tensor(ids)
        shape = tf.shape(ids, tf.int64)
        rows = tf.reduce_prod(shape[:-1])
        strings = self._decode_rows_tf(tf.reshape(ids, [-1]), tf.range(rows + 1) * shape[-1])
        return tf.reshape(strings, shape[:-1])

    def _decode_rows_tf(self, values: tf.Tensor, row_splits: tf.Tensor) -> tf.Tensor:
        """`[rows]` strings of the rows `values[row_splits[i]:row_splits[i + 1]]`."""
        strings = tf.numpy_function(self._decode_rows, [values, row_splits], tf.string,
                                    stateful=False)
        return tf.ensure_shape(strings, [None])

    def _encode_strings(self, strings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(int32 ids of all `strings` (bytes) one after another, int64 `[n]` counts)."""
        encoded = [self._encode(s) for s in strings]
        lengths = np.array([len(ids) for ids in encoded], np.int64)
        return np.array([i for ids in encoded for i in ids], np.int32), lengths

    def _decode_rows(self, values: np.ndarray, row_splits: np.ndarray) -> np.ndarray:
        """Object array of the UTF-8 texts of the rows of `values`."""
        texts = [self._decode(values[start:end]).encode("utf-8")
                 for start, end in zip(row_splits[:-1], row_splits[1:])]
        return np.array(texts, dtype=object).reshape([len(texts)])

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, TokenizerJsonVocabulary) and self.digest == other.digest
                and self.unk_id == other.unk_id and self.extra_ids == other.extra_ids)

    def __repr__(self) -> str:
        return f"TokenizerJsonVocabulary({self.path!r})"


def _tokenizer_config(path: str) -> dict:
    """The contents of the tokenizer_config.json at `path`, or {} if there is none."""
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except ValueError as err:
        raise DataError(f"cannot read {path!r}: {err}") from err


def _special_id(tokenizer: Any, config: dict, key: str, candidates: tuple[str, ...],
                config_path: str) -> Optional[int]:
    """The id of the token `config[key]` names (a string or {"content": ...}), else of the first
    of `candidates` the tokenizer knows, else None."""
    named = config.get(key)
    if isinstance(named, dict):
        named = named.get("content")
    if named:
        token_id = tokenizer.token_to_id(named)
        if token_id is None:
            raise DataError(f"{config_path!r} names {key} {named!r}, which is not a token of "
                            "the tokenizer.json beside it")
        return token_id
    ids = (tokenizer.token_to_id(token) for token in candidates)
    return next((i for i in ids if i is not None), None)


def tokenizer_json_vocabulary(path: str) -> TokenizerJsonVocabulary:
    """The vocabulary of the tokenizer.json at `path` (and the tokenizer_config.json beside it).

    The same files (same path, sizes and modification times) always give the same object. The
    path is not resolved: a Hugging Face cache links each snapshot's tokenizer.json to a shared
    blob, and the tokenizer_config.json that counts is the one beside the link.
    """
    config = os.path.join(os.path.dirname(path), "tokenizer_config.json")
    return _cached_tokenizer_json(os.path.abspath(path), _file_stamp(path), _file_stamp(config))


def _file_stamp(path: str) -> Optional[tuple[int, int]]:
    """(size, modification time in ns) of a file, or None if there is none."""
    if not os.path.isfile(path):
        return None
    stat = os.stat(path)
    return stat.st_size, stat.st_mtime_ns


@functools.lru_cache(maxsize=16)
def _cached_tokenizer_json(path: str, stamp: Optional[tuple[int, int]],
                           config_stamp: Optional[tuple[int, int]]) -> TokenizerJsonVocabulary:
    del stamp, config_stamp  # Only part of the cache key.
    return TokenizerJsonVocabulary(path)


def get_vocabulary(kind: str = "byte", sentencepiece_model: str | None = None,
                   tokenizer_file: str | None = None) -> seqio.Vocabulary:
    """The vocabulary of a kind.

    Args:
      kind: "byte" (default), "sentencepiece" or "tokenizer_json".
      sentencepiece_model: path of a SentencePiece model file; required for "sentencepiece".
      tokenizer_file: path of a tokenizer.json; required for "tokenizer_json".

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
    if kind == "tokenizer_json":
        if not tokenizer_file:
            raise DataError("vocabulary kind 'tokenizer_json' needs a tokenizer file: set "
                            "lexjax.data.DataConfig.tokenizer_file to a tokenizer.json")
        return tokenizer_json_vocabulary(tokenizer_file)
    raise DataError(f"unknown vocabulary kind {kind!r}; use one of {VOCABULARY_KINDS}")


def vocab_size(vocabulary: seqio.Vocabulary | None = None) -> int:
    """Number of token ids of `vocabulary` (default: bytes); 259 for bytes."""
    return int((vocabulary or byte_vocabulary()).vocab_size)


def vocabulary_id(vocabulary: seqio.Vocabulary) -> str:
    """A short name that changes whenever the token ids of a text would: keys caches and tasks.

    Returns "byte" for the byte vocabulary, "spm_<12 hex digits of the model's md5>" for a
    SentencePiece model and "tok_<12 hex digits of the md5 of the tokenizer.json and its EOS
    id>" for a tokenizer.json, so retraining a model at the same path never reuses stale tokens.
    """
    if isinstance(vocabulary, seqio.ByteVocabulary):
        extra = vocabulary.extra_ids
        return "byte" if not extra else f"byte_x{extra}"
    if isinstance(vocabulary, seqio.SentencePieceVocabulary):
        digest = hashlib.md5(vocabulary.sp_model).hexdigest()[:12]
        extra = vocabulary.extra_ids
        return f"spm_{digest}" if not extra else f"spm_{digest}_x{extra}"
    if isinstance(vocabulary, TokenizerJsonVocabulary):
        return f"tok_{vocabulary.digest[:12]}"
    raise DataError(
        f"unsupported vocabulary {vocabulary!r}; lexjax.data handles seqio.ByteVocabulary, "
        "seqio.SentencePieceVocabulary and TokenizerJsonVocabulary")


def word_roles(vocabulary: seqio.Vocabulary) -> np.ndarray:
    """int8 `[vocab_size]`: each id's role in words, for whole-word masking: `IN_WORD` (a word
    may go on after it) | `CONTINUES_WORD` (it joins the word of the token before it, when that
    one is `IN_WORD`).

    Bytes: letters, digits, `_` and the bytes of multi-byte UTF-8 characters (>= 0x80) have
    both bits; every other byte neither (words are runs of word bytes). SentencePiece: a piece
    with a leading "▁" starts a word (`IN_WORD`), any other normal piece continues one (both
    bits); control and unknown pieces have neither. tokenizer.json: see `_piece_role`.
    """
    size = vocab_size(vocabulary)
    roles = np.zeros(size, np.int8)
    if isinstance(vocabulary, seqio.ByteVocabulary):
        for byte in range(256):
            if _is_word_byte(byte):
                roles[byte + 3] = IN_WORD | CONTINUES_WORD
        return roles
    if isinstance(vocabulary, seqio.SentencePieceVocabulary):
        processor = vocabulary.tokenizer
        for i in range(min(size, processor.get_piece_size())):
            if processor.is_control(i) or processor.is_unknown(i):
                continue
            starts = processor.id_to_piece(i).startswith(METASPACE)
            roles[i] = IN_WORD if starts else IN_WORD | CONTINUES_WORD
        return roles
    if isinstance(vocabulary, TokenizerJsonVocabulary):
        _fill_tokenizer_json_roles(vocabulary.tokenizer, roles)
        return roles
    raise DataError(f"whole-word masking does not know the words of {vocabulary!r}")


def _fill_tokenizer_json_roles(tokenizer: Any, roles: np.ndarray) -> None:
    """Sets `roles[i]` to the role (`_piece_role`) of each normal piece of a `tokenizers`
    tokenizer; added tokens (special or not) keep 0."""
    spec = json.loads(tokenizer.to_str())
    byte_level = _has_type([spec.get("pre_tokenizer"), spec.get("decoder")], "ByteLevel")
    prefix = (spec.get("model") or {}).get("continuing_subword_prefix")
    added = tokenizer.get_added_tokens_decoder()
    for piece, i in tokenizer.get_vocab(with_added_tokens=False).items():
        if i not in added:
            roles[i] = _piece_role(piece, byte_level, prefix)


def _is_word_byte(byte: int) -> bool:
    """Letters, digits, `_` and the bytes of multi-byte UTF-8 characters."""
    char = chr(byte)
    return byte >= 0x80 or char == "_" or (char.isascii() and char.isalnum())


def _piece_role(piece: str, byte_level: bool, continuing_prefix: Optional[str]) -> int:
    """The word role of a normal piece of a tokenizer.json.

    Only pieces of word characters (letters, digits, `_`; in byte-level BPE, the word bytes of
    `_is_word_byte`) take part in words, after their marks: a piece that starts with a space
    (byte-level BPE's "Ġ") or "▁" starts a word (`IN_WORD`); with a continuing-subword prefix
    (WordPiece's "##"), a piece with it continues a word (both bits) and one without starts
    one; any other piece continues a word (both bits). A byte-fallback piece ("<0xE2>") is its
    byte, as in the byte vocabulary.
    """
    if continuing_prefix and piece.startswith(continuing_prefix):
        starts, body = False, piece[len(continuing_prefix):]
    else:
        starts, body = bool(continuing_prefix), piece
    if byte_level:
        data = _byte_level_bytes(body)
        if data is None:
            return 0
        marked = data.startswith(b" ")
        rest = data[1:] if marked else data
        is_word = all(map(_is_word_byte, rest))
    elif _BYTE_PIECE.fullmatch(body):
        word_byte = _is_word_byte(int(body[3:5], 16))
        return IN_WORD | CONTINUES_WORD if word_byte else 0
    else:
        marked = body.startswith(METASPACE)
        rest = body[1:] if marked else body
        is_word = all(char == "_" or char.isalnum() for char in rest)
    if not rest or not is_word:
        return 0
    return IN_WORD if starts or marked else IN_WORD | CONTINUES_WORD


@functools.lru_cache(maxsize=1)
def _byte_level_alphabet() -> dict[str, int]:
    """The byte each character of byte-level BPE pieces stands for (GPT-2's `bytes_to_unicode`,
    inverted): printable Latin-1 bytes stand for themselves, the others for chr(256 + n)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [byte for byte in range(256) if byte not in printable]
    alphabet = {chr(byte): byte for byte in printable}
    alphabet.update((chr(256 + n), byte) for n, byte in enumerate(others))
    return alphabet


def _byte_level_bytes(piece: str) -> Optional[bytes]:
    """The bytes a byte-level BPE piece stands for, or None if it is not made of that alphabet."""
    alphabet = _byte_level_alphabet()
    if not all(char in alphabet for char in piece):
        return None
    return bytes(alphabet[char] for char in piece)


def _has_type(component: Any, name: str) -> bool:
    """Whether a tokenizer.json component (pre-tokenizer, decoder, ...) is or holds a `name`."""
    if isinstance(component, dict):
        return component.get("type") == name or _has_type(list(component.values()), name)
    if isinstance(component, list):
        return any(_has_type(part, name) for part in component)
    return False
