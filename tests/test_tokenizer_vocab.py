"""Tests of the tokenizer.json vocabulary (`lexjax.data.vocab.TokenizerJsonVocabulary`) against
the `tokenizers` library itself, on tiny tokenizers trained here: a byte-level BPE, a WordPiece
(BERT-style, with a post-processor that adds [CLS] and [SEP]), a Unigram with "▁" marks, and a
hand-built byte-fallback BPE like Llama 2's."""
from __future__ import annotations

import json
import os
import re
import shutil
import sys

import lexjax.data as data  # First: it sets TensorFlow's quiet, CPU-only defaults before TF loads.
from lexjax.data import split_of, streams, tasks
from lexjax.data.vocab import TokenizerJsonVocabulary, vocabulary_id
from lexjax.objectives.masking import CONTINUES_WORD, IN_WORD

import pytest
import tensorflow as tf
from tokenizers import (Tokenizer, decoders, models, normalizers, pre_tokenizers, processors,
                        trainers)

pytestmark = pytest.mark.usefixtures("isolated_data_cache")

_WORDS = ("def return class import self lambda yield print value index number function "
          "tokenizer vocabulary whole word masking cafe café naïve 漢字").split()
TEXTS = [f"def function_{i}(x): return x * {i} + {_WORDS[i % len(_WORDS)]} "
         f"{_WORDS[(3 * i) % len(_WORDS)]}\n" for i in range(48)]
SAMPLE = "def café(x): return naïve_1 + 漢字 ✓\n\tprint(value)"
SPECIALS = ["<pad>", "</s>", "<unk>"]


def write(tokenizer: Tokenizer, directory: str) -> str:
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "tokenizer.json")
    tokenizer.save(path)
    return path


def byte_level_bpe() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(TEXTS, trainers.BpeTrainer(
        vocab_size=320, special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tokenizer


def wordpiece() -> Tokenizer:
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer()
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.train_from_iterator(TEXTS, trainers.WordPieceTrainer(
        vocab_size=150, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    tokenizer.post_processor = processors.BertProcessing(
        ("[SEP]", tokenizer.token_to_id("[SEP]")), ("[CLS]", tokenizer.token_to_id("[CLS]")))
    tokenizer.enable_truncation(8)  # The vocabulary encodes whole texts all the same.
    return tokenizer


def unigram() -> Tokenizer:
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.train_from_iterator(TEXTS, trainers.UnigramTrainer(
        vocab_size=120, special_tokens=SPECIALS, unk_token="<unk>"))
    return tokenizer


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """The tokenizer.json of each tiny tokenizer, each in a directory of its own."""
    root = str(tmp_path_factory.mktemp("tokenizers"))
    return {name: write(build(), os.path.join(root, name))
            for name, build in (("bpe", byte_level_bpe), ("wordpiece", wordpiece),
                                ("unigram", unigram))}


def vocabulary(path: str) -> TokenizerJsonVocabulary:
    return data.get_vocabulary("tokenizer_json", tokenizer_file=path)


def reference_ids(path: str, text: str) -> list[int]:
    tokenizer = Tokenizer.from_file(path)
    tokenizer.no_truncation()
    return tokenizer.encode(text, add_special_tokens=False).ids


# ----------------------------------------------------------------------------- encoding


@pytest.mark.parametrize("kind", ["bpe", "wordpiece", "unigram"])
def test_python_encode_decode_match_tokenizers(files, kind):
    path = files[kind]
    vocab, reference = vocabulary(path), Tokenizer.from_file(path)
    assert vocab.vocab_size == data.vocab_size(vocab) == reference.get_vocab_size(True)
    assert vocab.pad_id == 0
    for text in [SAMPLE, *TEXTS[:3], ""]:
        ids = vocab.encode(text)
        assert ids == reference_ids(path, text)  # No [CLS]/[SEP], not truncated.
        assert vocab.decode(ids) == reference.decode(ids)
        if kind == "bpe":  # The others lowercase, or lack "✓", newline and tab.
            assert vocab.decode(ids) == text
        # Decoding stops at EOS.
        assert vocab.decode(ids + [vocab.eos_id] + ids[:2]) == vocab.decode(ids)


@pytest.mark.parametrize("kind", ["bpe", "wordpiece"])
def test_tf_encode_decode_match_python(files, kind):
    vocab = vocabulary(files[kind])
    texts = [SAMPLE, TEXTS[5], ""]
    expected = [vocab.encode(text) for text in texts]
    assert vocab.encode_tf(tf.constant(SAMPLE)).numpy().tolist() == expected[0]
    assert vocab.encode_tf(tf.constant(texts)).to_list() == expected
    assert vocab.encode_tf(tf.constant([texts[:2], texts[1:]])).to_list() == \
        [expected[:2], expected[1:]]
    # In a tf.data pipeline (graph mode), as seqio's tokenize preprocessor calls it.
    dataset = tf.data.Dataset.from_tensor_slices(texts).map(vocab.encode_tf)
    assert dataset.element_spec.shape.as_list() == [None]
    assert [ids.tolist() for ids in dataset.as_numpy_iterator()] == expected

    decoded = [vocab.decode(ids).encode() for ids in expected]
    assert vocab.decode_tf(tf.constant(expected[0])).numpy() == decoded[0]
    width = max(map(len, expected)) + 2
    # Rows padded after EOS, as a model's output is: decoded up to the EOS.
    padded = [ids + [vocab.eos_id] + [5] * (width - len(ids) - 1) for ids in expected]
    assert vocab.decode_tf(tf.constant(padded)).numpy().tolist() == decoded
    assert vocab.decode_tf(tf.ragged.constant(expected)).numpy().tolist() == decoded
    assert vocab.decode_tf(tf.constant([padded[:2]])).numpy().tolist() == [decoded[:2]]
    dataset = tf.data.Dataset.from_tensor_slices(tf.constant(padded)).map(vocab.decode_tf)
    assert list(dataset.as_numpy_iterator()) == decoded


# ----------------------------------------------------------------------------- special ids


def test_eos_and_unk_from_known_names(files, tmp_path):
    bpe, wp = Tokenizer.from_file(files["bpe"]), Tokenizer.from_file(files["wordpiece"])
    vocab = vocabulary(files["bpe"])
    assert (vocab.eos_id, vocab.unk_id) == (bpe.token_to_id("</s>"), bpe.token_to_id("<unk>"))
    vocab = vocabulary(files["wordpiece"])
    assert (vocab.eos_id, vocab.unk_id) == (wp.token_to_id("[SEP]"), wp.token_to_id("[UNK]"))
    bare = Tokenizer(models.WordLevel({"a": 0, "b": 1}))
    vocab = vocabulary(write(bare, str(tmp_path / "bare")))
    assert (vocab.eos_id, vocab.unk_id) == (None, None)
    assert vocab.decode_tf(tf.constant([[0, 1], [1, 1]])).numpy().tolist() == [b"a b", b"b b"]


@pytest.mark.parametrize("form", ["string", "dict"])
def test_tokenizer_config_names_eos_and_unk(files, tmp_path, form):
    directory = str(tmp_path / "checkpoint")
    path = os.path.join(directory, "tokenizer.json")
    os.makedirs(directory)
    shutil.copy(files["bpe"], path)
    names = {"eos_token": "<pad>", "unk_token": "</s>"}
    if form == "dict":
        names = {key: {"content": token, "special": True} for key, token in names.items()}
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(names, f)
    reference = Tokenizer.from_file(path)
    vocab = vocabulary(path)
    assert (vocab.eos_id, vocab.unk_id) == (reference.token_to_id("<pad>"),
                                            reference.token_to_id("</s>"))
    assert vocabulary_id(vocab) != vocabulary_id(vocabulary(files["bpe"]))  # Another EOS.
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "<|im_end|>"}, f)
    with pytest.raises(data.DataError, match="names eos_token '<|im_end|>'"):
        vocabulary(path)


def test_transformers_save_pretrained_is_read_with_its_eos(files, tmp_path):
    transformers = pytest.importorskip("transformers")
    # "<|endoftext|>" is new to the tokenizer: transformers adds it; "</s>" is there but not EOS.
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_file(files["bpe"]), eos_token="<|endoftext|>",
        unk_token="<unk>")
    fast.save_pretrained(str(tmp_path / "hf"))
    vocab = vocabulary(str(tmp_path / "hf" / "tokenizer.json"))
    assert vocab.eos_id == fast.eos_token_id == fast.convert_tokens_to_ids("<|endoftext|>")
    assert vocab.eos_id != fast.convert_tokens_to_ids("</s>")
    assert vocab.unk_id == fast.unk_token_id
    assert vocab.vocab_size == len(fast)
    ids = vocab.encode(SAMPLE)
    assert ids == fast.encode(SAMPLE, add_special_tokens=False)
    assert vocab.decode(ids + [vocab.eos_id, 7]) == fast.decode(ids) == SAMPLE


def test_without_the_tokenizers_package(files, monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(data.DataError, match=r"pip install -e '\.\[convert\]'"):
        TokenizerJsonVocabulary(files["bpe"])


# ----------------------------------------------------------------------------- ids and caching


def test_vocabulary_id_follows_the_file(files, tmp_path):
    path = str(tmp_path / "tokenizer.json")
    shutil.copy(files["bpe"], path)
    first = vocabulary(path)
    assert vocabulary(path) is first  # Built once per file.
    assert re.fullmatch(r"tok_[0-9a-f]{12}", vocabulary_id(first))
    assert vocabulary_id(vocabulary(files["bpe"])) == vocabulary_id(first)  # Same contents.
    assert vocabulary(files["bpe"]) == first
    shutil.copy(files["unigram"], path)
    second = vocabulary(path)
    assert second is not first and second != first
    assert vocabulary_id(second) != vocabulary_id(first)
    assert second.encode(SAMPLE) == reference_ids(files["unigram"], SAMPLE)


def test_unreadable_files_are_one_line_errors(tmp_path):
    missing = str(tmp_path / "missing" / "tokenizer.json")
    with pytest.raises(data.DataError, match=re.escape(repr(missing))):
        vocabulary(missing)
    broken = tmp_path / "tokenizer.json"
    broken.write_text("{not json")
    with pytest.raises(data.DataError, match="cannot read tokenizer file"):
        vocabulary(str(broken))


# ----------------------------------------------------------------------------- word roles


def role(vocab, piece: str) -> int:
    token_id = vocab.tokenizer.token_to_id(piece)
    assert token_id is not None, piece
    return int(data.word_roles(vocab)[token_id])


def words_of(vocab, text: str) -> list[str]:
    """The words whole-word masking sees in `text`: runs of `IN_WORD` tokens joined by
    `CONTINUES_WORD`, as `lexjax.objectives.masking` joins them."""
    ids = vocab.encode(text)
    roles = data.word_roles(vocab)[ids]
    words, current = [], []
    for i, token_id in enumerate(ids):
        joins = i > 0 and roles[i] & CONTINUES_WORD and roles[i - 1] & IN_WORD
        if not joins and current:
            words.append(vocab.tokenizer.decode(current).strip())
            current = []
        if roles[i] & IN_WORD:
            current.append(token_id)
    return words + ([vocab.tokenizer.decode(current).strip()] if current else [])


def test_word_roles_of_byte_level_bpe(files, tmp_path):
    tokenizer = Tokenizer.from_file(files["bpe"])
    tokenizer.add_tokens(["<extra>"])
    tokenizer.add_special_tokens(["<mask>"])
    vocab = vocabulary(write(tokenizer, str(tmp_path / "added")))
    both = IN_WORD | CONTINUES_WORD
    assert role(vocab, "Ġreturn") == role(vocab, "Ġx") == IN_WORD
    assert role(vocab, "a") == role(vocab, "_") == role(vocab, "7") == both
    assert role(vocab, "Ã") == role(vocab, "Ã©") == both  # Bytes of "é": word bytes.
    for piece in ["Ġ", "(", "):", "Ġ*", "Ċ", "ĉ", "</s>", "<pad>", "<extra>", "<mask>"]:
        assert role(vocab, piece) == 0, piece
    # Words are runs of word bytes, as with the byte vocabulary: "✓" (3 bytes >= 0x80) is one.
    assert words_of(vocab, SAMPLE) == ["def", "café", "x", "return", "naïve_1", "漢字", "✓",
                                       "print", "value"]


def test_word_roles_of_wordpiece(files):
    vocab = vocabulary(files["wordpiece"])
    both = IN_WORD | CONTINUES_WORD
    continuations = [p for p in vocab.tokenizer.get_vocab() if re.fullmatch(r"##\w+", p)]
    assert continuations and {role(vocab, p) for p in continuations} == {both}
    assert role(vocab, "def") == role(vocab, "x") == role(vocab, "a") == IN_WORD
    for piece in ["(", ":", "[CLS]", "[SEP]", "[UNK]", "[PAD]"]:
        assert role(vocab, piece) == 0, piece
    assert words_of(vocab, "def tokenizer(vocabulary): return whole words") == \
        ["def", "tokenizer", "vocabulary", "return", "whole", "words"]


def test_word_roles_of_unigram(files):
    vocab = vocabulary(files["unigram"])
    pieces = vocab.tokenizer.get_vocab(with_added_tokens=False)
    starts = [p for p in pieces if re.fullmatch(r"▁\w+", p)]
    inner = [p for p in pieces if re.fullmatch(r"\w+", p)]
    assert starts and {role(vocab, p) for p in starts} == {IN_WORD}
    assert inner and {role(vocab, p) for p in inner} == {IN_WORD | CONTINUES_WORD}
    assert role(vocab, "▁") == role(vocab, "</s>") == 0
    assert words_of(vocab, "def tokenizer(vocabulary): return whole") == \
        ["def", "tokenizer", "vocabulary", "return", "whole"]


def test_word_roles_of_byte_fallback_bpe(tmp_path):
    pieces = ["<unk>", "</s>", "▁", "d", "e", "f", "▁d", "▁de", "▁def", "<0x0A>", "<0x28>",
              "<0x5F>", "<0xE2>", "<0x9C>", "<0x93>"]
    tokenizer = Tokenizer(models.BPE({p: i for i, p in enumerate(pieces)},
                                     [("▁", "d"), ("▁d", "e"), ("▁de", "f")],
                                     unk_token="<unk>", byte_fallback=True))
    tokenizer.add_special_tokens(["<unk>", "</s>"])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                           decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    vocab = vocabulary(write(tokenizer, str(tmp_path / "llama")))
    assert vocab.encode("def ✓") == [8, 2, 12, 13, 14]  # "✓" falls back to its bytes.
    assert vocab.decode([8, 2, 12, 13, 14]) == "def ✓"
    assert [role(vocab, p) for p in ["▁def", "e", "<0x5F>", "<0xE2>", "<0x0A>", "<0x28>", "▁"]] \
        == [IN_WORD] + [IN_WORD | CONTINUES_WORD] * 3 + [0] * 3
    assert words_of(vocab, "def ✓ de_f") == ["def", "✓", "de_f"]


# ----------------------------------------------------------------------------- DataConfig


def test_data_config_selects_the_tokenizer(files, tmp_path):
    config = data.DataConfig(task=data.STDLIB_CODE, vocabulary="tokenizer_json",
                             tokenizer_file=files["bpe"])
    vocab = config.seqio_vocabulary()
    assert vocab is vocabulary(files["bpe"])
    assert tasks.derived_name(config) == f"{data.STDLIB_CODE}.{vocabulary_id(vocab)}"
    with pytest.raises(data.DataError, match="DataConfig.tokenizer_file"):
        data.DataConfig(task=data.STDLIB_CODE, vocabulary="tokenizer_json")
    with pytest.raises(data.DataError, match="DataConfig.tokenizer_file"):
        data.get_vocabulary("tokenizer_json")
    # A file that does not exist is reported when the data is first read.
    missing = str(tmp_path / "tokenizer.json")
    config = data.DataConfig(task=data.STDLIB_CODE, vocabulary="tokenizer_json",
                             tokenizer_file=missing)
    with pytest.raises(data.DataError, match="tokenizer file not found"):
        config.seqio_vocabulary()


def test_text_files_task_tokenizes_and_caches_with_the_tokenizer(files, tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    texts = {f"doc{i:03d}.txt": TEXTS[i] + SAMPLE for i in range(12)}
    for name, text in texts.items():
        (root / name).write_text(text, encoding="utf-8")
    config = data.DataConfig(task=data.TEXT_FILES, text_files_glob=str(root / "*.txt"),
                             vocabulary="tokenizer_json", tokenizer_file=files["bpe"])
    vocab = config.seqio_vocabulary()
    split = split_of(sorted(texts)[0])
    expected = [vocab.encode(texts[name]) + [vocab.eos_id]
                for name in sorted(texts) if split_of(name) == split]
    cache = str(tmp_path / "cache")
    stream = streams.materialized_stream(config, split, cache_dir=cache)
    assert stream.tokens.tolist() == [i for ids in expected for i in ids]
    assert os.listdir(os.path.join(cache, data.TEXT_FILES)) == [vocabulary_id(vocab)]
