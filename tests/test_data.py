"""Tests of lexjax.data against independent references.

Most tests use a small `lexjax.text_files` corpus written to a temporary directory and named by
a `DataConfig`; its expected token stream is rebuilt here from the files' bytes (byte id =
byte + 3, EOS = 1) and the expected splits from SHA-1 directly, without going through the code
under test.
"""
from __future__ import annotations

import hashlib
import os
import shutil

import lexjax.data as data  # First: it sets TensorFlow's quiet, CPU-only defaults before TF loads.
from lexjax.data import packing, streams, tasks, train_sentencepiece

import gin
import numpy as np
import pytest
import sentencepiece as spm
import seqio
import tensorflow_datasets as tfds

import lexjax.config

LENGTH = 32
EOS = 1
PAD = 0
TFDS_TASKS = ["lexjax.pg19", "lexjax.wiki40b_en", "lexjax.c4_en", "lexjax.arxiv", "lexjax.lm1b"]
_WORDS = ("the cat sat on a mat while üñíçødé 漢字 and def f(x): return x\n\tindent "
          "lorem ipsum dolor sit amet 12345 ").split(" ")


def reference_split(relpath: str) -> str:
    u = int(hashlib.sha1(relpath.encode("utf-8")).hexdigest()[:16], 16) / 2**64
    return "train" if u < 0.90 else "validation" if u < 0.95 else "test"


def reference_stream(texts: list[str]) -> np.ndarray:
    ids = []
    for text in texts:
        ids.extend(b + 3 for b in text.encode("utf-8"))
        ids.append(EOS)
    return np.array(ids, dtype=np.int32)


def reference_pieces(documents: list[np.ndarray], length: int) -> np.ndarray:
    """Each document cut into consecutive pieces of `length` tokens (the last one shorter), each
    piece padded with PAD to `length`: `[num_pieces, length]`."""
    rows = []
    for document in documents:
        for start in range(0, len(document), length):
            piece = list(document[start:start + length])
            rows.append(piece + [PAD] * (length - len(piece)))
    return np.array(rows, dtype=np.int32).reshape(-1, length)


def sorted_rows(a: np.ndarray) -> np.ndarray:
    return a[np.lexsort(a.T[::-1])]


class TextCorpus:
    """A corpus written to disk, with the texts of each split in sorted relative-path order, and
    the `DataConfig` of the `lexjax.text_files` task reading it (bytes)."""

    def __init__(self, root: str, texts: dict[str, str]):
        self.root = root
        self.glob = os.path.join(root, "**", "*.txt")
        self.config = data.DataConfig(task=data.TEXT_FILES, text_files_glob=self.glob)
        self.texts = texts
        self.by_split = {s: [texts[p] for p in sorted(texts) if reference_split(p) == s]
                         for s in data.SPLITS}

    def stream(self, split: str) -> np.ndarray:
        return reference_stream(self.by_split[split])

    def documents(self, split: str) -> list[np.ndarray]:
        """Each document of the split as its tokens, EOS included."""
        return [reference_stream([text]) for text in self.by_split[split]]


def write_corpus(root: str, min_files: int = 40) -> TextCorpus:
    """Writes files until every split has a few documents, the test split short and long ones."""
    rng = np.random.default_rng(0)
    letters = list("abcdefghijklmnopqrstuvwxyz")
    words = _WORDS + ["".join(rng.choice(letters, int(rng.integers(3, 10)))) for _ in range(300)]
    texts: dict[str, str] = {}
    i = 0
    while True:
        relpath = f"dir{i % 3}/sub{i % 2}/doc{i:03d}.txt"
        n_words = int(rng.integers(2, 400))
        texts[relpath] = f"document {i}: " + " ".join(rng.choice(words, n_words))
        i += 1
        counts = {s: sum(reference_split(p) == s for p in texts) for s in data.SPLITS}
        test_sizes = [len(t.encode()) for p, t in texts.items() if reference_split(p) == "test"]
        if (i >= min_files and counts["validation"] >= 2 and counts["test"] >= 3
                and min(test_sizes) < 100 < 1000 < max(test_sizes)):
            break
    for relpath, text in texts.items():
        path = os.path.join(root, *relpath.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    return TextCorpus(root, texts)


pytestmark = pytest.mark.usefixtures("isolated_data_cache")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> TextCorpus:
    return write_corpus(str(tmp_path_factory.mktemp("corpus")))


def take(iterator, n: int) -> list[np.ndarray]:
    batches = [next(iterator) for _ in range(n)]
    iterator.close()
    return batches


# ----------------------------------------------------------------------------- splits


def test_stdlib_splits_partition_deterministically():
    corpus = data.stdlib_corpus()
    assert corpus.relpaths == data.stdlib_corpus().relpaths
    assert len(corpus.relpaths) > 500
    assert all(not p.startswith("/") and "site-packages" not in p for p in corpus.relpaths)
    assert "os.py" in corpus.relpaths and "json/decoder.py" in corpus.relpaths
    splits = {s: set(corpus.relpaths_of(s)) for s in data.SPLITS}
    assert set().union(*splits.values()) == set(corpus.relpaths)
    assert sum(len(v) for v in splits.values()) == len(corpus.relpaths)  # Pairwise disjoint.
    for split, relpaths in splits.items():
        assert all(reference_split(p) == split for p in relpaths)
    assert 0.85 < len(splits["train"]) / len(corpus.relpaths) < 0.95
    assert splits["validation"] and splits["test"]
    no_tests = data.stdlib_corpus(include_test_suites=False).relpaths
    assert set(no_tests) < set(corpus.relpaths)
    assert not any(p.startswith("test/") for p in no_tests)


def test_text_file_splits_do_not_depend_on_location(corpus, tmp_path):
    here = data.text_files_corpus(corpus.glob)
    moved_root = str(tmp_path / "elsewhere")
    shutil.copytree(corpus.root, moved_root)
    moved = data.text_files_corpus(os.path.join(moved_root, "**", "*.txt"))
    assert here.relpaths == moved.relpaths == tuple(sorted(corpus.texts))
    for split in data.SPLITS:
        assert here.relpaths_of(split) == moved.relpaths_of(split)
        assert [open(f, encoding="utf-8").read() for f in here.files(split)] == \
            corpus.by_split[split]
    assert tasks.local_corpus(corpus.config) == here


# ----------------------------------------------------------------------------- vocabularies


def test_byte_vocabulary_round_trip():
    vocabulary = data.get_vocabulary()
    assert data.vocab_size() == data.BYTE_VOCAB_SIZE == vocabulary.vocab_size == 259
    assert (vocabulary.pad_id, vocabulary.eos_id, vocabulary.unk_id) == (0, 1, 2)
    text = "déf f(x):\n\treturn 漢字 ✓"
    ids = vocabulary.encode(text)
    assert ids == [b + 3 for b in text.encode("utf-8")]
    assert vocabulary.decode(ids) == text
    assert vocabulary.decode(vocabulary.encode_tf(text).numpy().tolist()) == text


def test_data_config_defaults_and_validation(tmp_path):
    config = data.DataConfig(task=data.STDLIB_CODE)
    assert (config.vocabulary, config.sentencepiece_model, config.text_files_glob) == \
        ("byte", None, None)
    assert config.seqio_vocabulary().vocab_size == data.BYTE_VOCAB_SIZE
    with pytest.raises(data.DataError, match="'byte', 'sentencepiece'"):
        data.DataConfig(task=data.STDLIB_CODE, vocabulary="wordpiece")
    with pytest.raises(data.DataError, match="needs a model file.*SENTENCEPIECE_MODEL"):
        data.DataConfig(task=data.STDLIB_CODE, vocabulary="sentencepiece")
    with pytest.raises(data.DataError, match="task name"):
        data.DataConfig(task="")
    # The plain vocabulary function checks the same.
    with pytest.raises(data.DataError, match="'byte', 'sentencepiece'"):
        data.get_vocabulary("wordpiece")
    with pytest.raises(data.DataError, match="needs a model file"):
        data.get_vocabulary("sentencepiece")
    missing = str(tmp_path / "missing.model")
    with pytest.raises(data.DataError, match="train_sentencepiece"):
        data.get_vocabulary("sentencepiece", missing)
    # A model file that does not exist is reported when the data is first read.
    unreadable = data.DataConfig(task=data.STDLIB_CODE, vocabulary="sentencepiece",
                                 sentencepiece_model=missing)
    with pytest.raises(data.DataError, match="train_sentencepiece"):
        data.eval_windows(unreadable, length=8)


def test_data_gins_configure_the_data_config():
    from lexjax.runs import configured_training

    # Gin files bind globally, so this test clears the global config after.
    gin_files = ["configs/runs/quickstart.gin", "configs/data/text_files.gin",
                 "configs/data/sentencepiece.gin"]
    try:
        lexjax.config.parse_gin(
            gin_files, ["TEXT_FILES_GLOB = '/corpus/*.txt'", "SENTENCEPIECE_MODEL = '/m.model'"])
        assert gin.query_parameter("%TEXT_FILES_GLOB") == "/corpus/*.txt"
        assert gin.query_parameter("%MIXTURE_OR_TASK_NAME") == data.TEXT_FILES
        assert gin.query_parameter("lexjax.data.DataConfig.vocabulary") == "sentencepiece"
        configured = configured_training()[1].data
        assert configured == data.DataConfig(
            task="lexjax.text_files", vocabulary="sentencepiece", sentencepiece_model="/m.model",
            text_files_glob="/corpus/*.txt")
        # The run gin alone: the stdlib task, bytes.
        lexjax.config.parse_gin(gin_files[:1])
        assert configured_training()[1].data == data.DataConfig(task=data.STDLIB_CODE)
        # Both data macros are required.
        with pytest.raises(lexjax.config.ConfigError, match="TEXT_FILES_GLOB"):
            lexjax.config.parse_gin(gin_files[:2])
        with pytest.raises(lexjax.config.ConfigError, match="SENTENCEPIECE_MODEL"):
            lexjax.config.parse_gin(gin_files, ["TEXT_FILES_GLOB = '/corpus/*.txt'"])
    finally:
        gin.clear_config()


# ----------------------------------------------------------------------------- packing functions


def test_segment_ids_by_hand():
    tokens = np.array([
        [5, 6, EOS, 7, EOS, 8, PAD, PAD],  # EOS in the middle, a document cut short, padding
        [EOS, 9, 9, 9, 9, 9, 9, EOS],  # EOS first (end of the previous row's document) and last
        [7, 7, 7, EOS, PAD, PAD, PAD, PAD],  # a padded document piece
        [4, 4, 4, 4, 4, 4, 4, 4],  # the middle of one long document
        [PAD] * 8,
    ])
    expected = np.array([
        [1, 1, 1, 2, 2, 3, 0, 0],
        [1, 2, 2, 2, 2, 2, 2, 2],
        [1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 1, 1],
        [0, 0, 0, 0, 0, 0, 0, 0],
    ])
    ids = data.segment_ids(tokens)
    assert ids.dtype == np.int32 and ids.shape == tokens.shape
    np.testing.assert_array_equal(ids, expected)
    # Any leading shape: rows are independent.
    np.testing.assert_array_equal(data.segment_ids(tokens[0]), expected[0])
    np.testing.assert_array_equal(data.segment_ids(np.stack([tokens, tokens[::-1]])),
                                  np.stack([expected, expected[::-1]]))
    assert (data.PAD_ID, data.EOS_ID) == (PAD, EOS)


def test_document_pieces_and_gather_pieces_by_hand():
    # Documents of 3 (< L), 4 (= L) and 9 (> 2 L) tokens, L = 4.
    documents = [np.array([11, 12, EOS]), np.array([21, 22, 23, EOS]),
                 np.array([31, 32, 33, 34, 35, 36, 37, 38, EOS])]
    tokens = np.concatenate(documents).astype(np.uint16)  # Streams are stored as uint16.
    doc_starts = np.array([0, 3, 7, 16])
    starts, ends = packing.document_pieces(doc_starts, 4)
    np.testing.assert_array_equal(starts, [0, 3, 7, 11, 15])
    np.testing.assert_array_equal(ends, [3, 7, 11, 15, 16])
    rows = packing.gather_pieces(tokens, starts, ends, 4)
    assert rows.dtype == np.int32
    np.testing.assert_array_equal(rows, [
        [11, 12, EOS, PAD],
        [21, 22, 23, EOS],
        [31, 32, 33, 34],
        [35, 36, 37, 38],
        [EOS, PAD, PAD, PAD],
    ])
    np.testing.assert_array_equal(rows, reference_pieces(documents, 4))
    # Any subset of pieces, in any order, gathers the same rows.
    np.testing.assert_array_equal(
        packing.gather_pieces(tokens, starts[[4, 0, 2]], ends[[4, 0, 2]], 4), rows[[4, 0, 2]])


@pytest.mark.parametrize("length", [1, 5, 16])
def test_document_pieces_match_a_python_construction(rng, length):
    sizes = np.concatenate([[1, length, 2 * length + 3], rng.integers(1, 4 * length, 20)])
    documents = [np.append(rng.integers(3, 259, size - 1), EOS) for size in sizes]
    doc_starts = np.concatenate([[0], np.cumsum(sizes)])
    starts, ends = packing.document_pieces(doc_starts, length)
    expected = reference_pieces(documents, length)
    tokens = np.concatenate(documents)
    np.testing.assert_array_equal(packing.gather_pieces(tokens, starts, ends, length), expected)
    assert (ends - starts <= length).all() and (ends > starts).all()
    pieces = list(packing.pad_documents(iter(documents), length))
    assert all(p.dtype == np.int32 and p.shape == (length,) for p in pieces)
    np.testing.assert_array_equal(np.stack(pieces), expected)
    assert list(packing.pad_documents([], length)) == []


# ----------------------------------------------------------------------------- training batches


def test_packing_is_exact(corpus):
    expected = corpus.stream("train")
    num_examples = len(expected) // LENGTH
    batch_size = 8
    steps = -(-num_examples // batch_size) + 2  # One epoch and a bit of the next.
    rows = np.concatenate(take(data.train_batches(
        corpus.config, length=LENGTH, batch_size=batch_size, shuffle=False), steps))
    assert rows.dtype == np.int32 and rows.shape[1] == LENGTH
    np.testing.assert_array_equal(rows[:num_examples].reshape(-1), expected[:num_examples * LENGTH])
    # The next epoch starts over from the first example.
    np.testing.assert_array_equal(rows[num_examples:].reshape(-1),
                                  expected[:(len(rows) - num_examples) * LENGTH])


def test_shuffled_epochs_are_permutations_of_the_examples(corpus):
    expected = corpus.stream("train")[:len(corpus.stream("train")) // LENGTH * LENGTH]
    expected = expected.reshape(-1, LENGTH)
    num_examples = len(expected)
    batch_size = 4
    steps = -(-2 * num_examples // batch_size)
    rows = np.concatenate(take(data.train_batches(
        corpus.config, length=LENGTH, batch_size=batch_size, seed=3), steps))
    epoch0, epoch1 = rows[:num_examples], rows[num_examples:2 * num_examples]
    np.testing.assert_array_equal(sorted_rows(epoch0), sorted_rows(expected))
    np.testing.assert_array_equal(sorted_rows(epoch1), sorted_rows(expected))
    assert not np.array_equal(epoch0, expected)  # Shuffled...
    assert not np.array_equal(epoch0, epoch1)  # ...differently each epoch.


def test_order_is_deterministic_per_seed(corpus):
    def first(seed):
        return np.stack(take(data.train_batches(
            corpus.config, length=LENGTH, batch_size=4, seed=seed), 5))
    np.testing.assert_array_equal(first(0), first(0))
    assert not np.array_equal(first(0), first(1))


def test_start_step_resumes_the_stream(corpus):
    num_examples = len(corpus.stream("train")) // LENGTH
    # Not a divisor of the number of examples, so that some batches straddle two epochs.
    batch_size = next(b for b in (5, 6, 7, 9, 11) if num_examples % b)
    steps_per_epoch = num_examples // batch_size
    uninterrupted = take(data.train_batches(
        corpus.config, length=LENGTH, batch_size=batch_size, seed=7), 2 * steps_per_epoch + 4)
    for start in (0, 1, steps_per_epoch, steps_per_epoch + 1, 2 * steps_per_epoch):
        resumed = take(data.train_batches(corpus.config, length=LENGTH, batch_size=batch_size,
                                          seed=7, start_step=start), 3)
        for got, want in zip(resumed, uninterrupted[start:start + 3]):
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("num_shards", [2, 4])
def test_host_shards_partition_the_global_batch(corpus, num_shards):
    kwargs = dict(length=LENGTH, batch_size=8, seed=1, start_step=3)
    global_batches = take(data.train_batches(corpus.config, **kwargs), 40)
    shards = [take(data.train_batches(corpus.config, shard_index=i, num_shards=num_shards,
                                      **kwargs), 40) for i in range(num_shards)]
    for step, want in enumerate(global_batches):
        got = np.concatenate([shard[step] for shard in shards])
        assert shards[0][step].shape == (8 // num_shards, LENGTH)
        np.testing.assert_array_equal(got, want)


# ----------------------------------------------------------------------------- padded batches


def check_padded_rows(rows: np.ndarray, length: int) -> None:
    """Every row is one piece of one document: tokens, then only padding; EOS only last."""
    assert rows.dtype == np.int32 and rows.shape[-1] == length
    rows = rows.reshape(-1, length)
    num_tokens = (rows != PAD).sum(axis=1)
    assert (num_tokens > 0).all()
    inside = np.arange(length) < num_tokens[:, None]
    assert ((rows != PAD) == inside).all()  # Padding only at the end.
    last = np.arange(length) == num_tokens[:, None] - 1
    assert not (rows == EOS)[~last].any()  # An EOS can only end the row's document piece.
    assert set(np.unique(data.segment_ids(rows)).tolist()) <= {0, 1}
    # A row with padding ends its document.
    assert (rows[num_tokens < length, :][last[num_tokens < length]] == EOS).all()


def test_padded_batches_are_the_document_pieces_in_order(corpus):
    documents = corpus.documents("train")
    assert max(len(d) for d in documents) > 2 * LENGTH and min(len(d) for d in documents) > 1
    # The materialized stream the rows are cut from is the reference stream.
    stream = streams.materialized_stream(corpus.config, "train")
    np.testing.assert_array_equal(stream.tokens, corpus.stream("train"))
    np.testing.assert_array_equal(stream.doc_starts,
                                  np.cumsum([0] + [len(d) for d in documents]))
    expected = reference_pieces(documents, LENGTH)
    num_pieces = len(expected)
    batch_size = 8
    steps = -(-num_pieces // batch_size) + 2  # One epoch and a bit of the next.
    batches = take(data.train_batches(corpus.config, length=LENGTH, batch_size=batch_size,
                                      shuffle=False, pack=False), steps)
    assert all(b.shape == (batch_size, LENGTH) for b in batches)
    rows = np.concatenate(batches)
    check_padded_rows(rows, LENGTH)
    np.testing.assert_array_equal(rows[:num_pieces], expected)
    # The rows' tokens, without padding, are exactly the split's stream...
    epoch = rows[:num_pieces]
    np.testing.assert_array_equal(epoch[epoch != PAD], corpus.stream("train"))
    # ...and every row is a slice of one document of it, starting at a multiple of LENGTH.
    tokens = np.asarray(stream.tokens)
    position = 0
    for row in epoch:
        n = int((row != PAD).sum())
        document = np.searchsorted(stream.doc_starts, position, side="right") - 1
        assert (position - stream.doc_starts[document]) % LENGTH == 0
        assert position + n <= stream.doc_starts[document + 1]
        np.testing.assert_array_equal(row[:n], tokens[position:position + n])
        position += n
    assert position == len(tokens)
    # The next epoch starts over from the first piece.
    np.testing.assert_array_equal(rows[num_pieces:], expected[:len(rows) - num_pieces])


def test_padded_batches_shuffle_resume_and_shard(corpus):
    expected = reference_pieces(corpus.documents("train"), LENGTH)
    num_pieces = len(expected)
    # Not a divisor of the number of pieces, so that some batches straddle two epochs.
    batch_size = next(b for b in (4, 8, 12, 16) if num_pieces % b)
    steps_per_epoch = num_pieces // batch_size
    kwargs = dict(length=LENGTH, batch_size=batch_size, seed=4, pack=False)
    straight = take(data.train_batches(corpus.config, **kwargs), 2 * steps_per_epoch + 4)
    rows = np.concatenate(straight)
    check_padded_rows(rows, LENGTH)
    epoch0, epoch1 = rows[:num_pieces], rows[num_pieces:2 * num_pieces]
    np.testing.assert_array_equal(sorted_rows(epoch0), sorted_rows(expected))
    np.testing.assert_array_equal(sorted_rows(epoch1), sorted_rows(expected))
    assert not np.array_equal(epoch0, expected) and not np.array_equal(epoch0, epoch1)
    for start in (1, steps_per_epoch, 2 * steps_per_epoch):
        resumed = take(data.train_batches(corpus.config, start_step=start, **kwargs), 3)
        for got, want in zip(resumed, straight[start:start + 3]):
            np.testing.assert_array_equal(got, want)
    shards = [take(data.train_batches(corpus.config, shard_index=i, num_shards=4, **kwargs),
                   steps_per_epoch + 2) for i in range(4)]
    for step, want in enumerate(straight[:steps_per_epoch + 2]):
        assert shards[0][step].shape == (batch_size // 4, LENGTH)
        np.testing.assert_array_equal(np.concatenate([shard[step] for shard in shards]), want)
    # Packed and padded batches differ (padded rows hold PAD).
    packed = take(data.train_batches(corpus.config, length=LENGTH, batch_size=batch_size,
                                     shuffle=False), 1)[0]
    assert (packed != PAD).all() and (rows == PAD).any()


# ----------------------------------------------------------------------------- row streams


def test_row_streams_continue_segment_after_segment(corpus):
    """Row i of batch k + 1 continues row i of batch k inside an epoch; each epoch's rows are the
    B row streams of the stream (each E * L tokens), reassigned to rows by a seeded order."""
    expected = corpus.stream("train")
    batch_size = 4
    segments = data.stream_segments(corpus.config, length=LENGTH, batch_size=batch_size)
    assert segments == len(expected) // batch_size // LENGTH
    rows = np.stack(take(data.stream_batches(corpus.config, length=LENGTH,
                                             batch_size=batch_size, seed=2), 2 * segments))
    assert rows.shape == (2 * segments, batch_size, LENGTH) and rows.dtype == np.int32
    span = segments * LENGTH
    streams = expected[:batch_size * span].reshape(batch_size, span)
    for epoch in range(2):
        read = rows[epoch * segments:(epoch + 1) * segments]  # [E, B, L]
        per_row = read.transpose(1, 0, 2).reshape(batch_size, span)
        np.testing.assert_array_equal(sorted_rows(per_row), sorted_rows(streams))
    first, second = (rows[e * segments].tolist() for e in range(2))
    assert first != second  # the rows get other streams in the next epoch


def test_row_streams_resume_and_shard(corpus):
    kwargs = dict(length=LENGTH, batch_size=4, seed=5)
    segments = data.stream_segments(corpus.config, length=LENGTH, batch_size=4)
    straight = take(data.stream_batches(corpus.config, **kwargs), segments + 3)
    for start in (1, segments - 1, segments):
        resumed = take(data.stream_batches(corpus.config, start_step=start, **kwargs), 3)
        for got, want in zip(resumed, straight[start:start + 3]):
            np.testing.assert_array_equal(got, want)
    halves = [take(data.stream_batches(corpus.config, shard_index=i, num_shards=2, **kwargs),
                   segments + 3) for i in range(2)]
    for step, want in enumerate(straight):
        np.testing.assert_array_equal(np.concatenate([h[step] for h in halves]), want)


def test_row_streams_need_enough_tokens_and_a_local_task(corpus):
    with pytest.raises(data.DataError, match="fewer than one segment"):
        data.stream_segments(corpus.config, length=len(corpus.stream("train")), batch_size=2)
    with pytest.raises(data.DataError, match="local task"):
        data.stream_segments("lexjax.pg19", length=LENGTH, batch_size=2)


# ----------------------------------------------------------------------------- evaluation


def test_eval_windows_cut_the_test_stream(corpus):
    expected = corpus.stream("test")
    n = len(expected) // LENGTH
    windows = data.eval_windows(corpus.config, length=LENGTH)
    assert windows.dtype == np.int32 and windows.shape == (n, LENGTH)
    np.testing.assert_array_equal(windows.reshape(-1), expected[:n * LENGTH])
    np.testing.assert_array_equal(data.eval_windows(corpus.config, length=LENGTH), windows)
    np.testing.assert_array_equal(
        data.eval_windows(corpus.config, length=LENGTH, max_windows=2), windows[:2])


def test_eval_windows_respect_documents(corpus):
    expected = []
    for text in corpus.by_split["test"]:
        document = reference_stream([text])
        expected += [document[i:i + LENGTH] for i in range(0, len(document) - LENGTH + 1, LENGTH)]
    windows = data.eval_windows(corpus.config, length=LENGTH, respect_documents=True)
    np.testing.assert_array_equal(windows, np.stack(expected))
    assert (windows[:, :-1] != EOS).all()  # EOS only ever ends a window: no boundary inside.
    # With longer windows some documents are too short to give any, and are dropped.
    sizes = [len(t.encode("utf-8")) + 1 for t in corpus.by_split["test"]]
    assert min(sizes) < 4 * LENGTH <= max(sizes)
    long_windows = data.eval_windows(corpus.config, length=4 * LENGTH, respect_documents=True)
    assert len(long_windows) == sum(size // (4 * LENGTH) for size in sizes)


def test_bytes_per_token_of_bytes_is_one(corpus):
    assert data.bytes_per_token(corpus.config, "test") == 1.0


def test_stdlib_code_task_smoke():
    windows = data.eval_windows(data.STDLIB_CODE, length=256, max_windows=4,
                                respect_documents=True)
    assert windows.shape == (4, 256)
    text = bytes(int(t) - 3 for t in windows[0]).decode("utf-8", errors="replace")
    assert "import" in text or "def " in text
    # A bare task name is that task with the byte vocabulary.
    config = data.DataConfig(task=data.STDLIB_CODE, vocabulary="byte")
    np.testing.assert_array_equal(
        data.eval_windows(config, length=256, max_windows=4, respect_documents=True), windows)
    assert data.get_task(config) is data.get_task(data.STDLIB_CODE)


# ----------------------------------------------------------------------------- TFDS corpora


@pytest.mark.parametrize("task_name", TFDS_TASKS)
def test_tfds_tasks_produce_batches_on_mock_data(task_name):
    with tfds.testing.mock_data(num_examples=8):
        kwargs = dict(length=16, batch_size=4, seed=0, shuffle_buffer_size=8)
        batches = take(data.train_batches(task_name, **kwargs), 4)
        assert all(b.shape == (4, 16) and b.dtype == np.int32 for b in batches)
        tokens = np.concatenate(batches)
        assert tokens.min() >= 1 and tokens.max() < 259 and (tokens > 2).mean() > 0.5
        resumed = take(data.train_batches(task_name, start_step=3, **kwargs), 1)[0]
        np.testing.assert_array_equal(resumed, batches[3])
        padded = take(data.train_batches(task_name, pack=False, **kwargs), 2)
        assert all(b.shape == (4, 16) for b in padded)
        check_padded_rows(np.concatenate(padded), 16)
        windows = data.eval_windows(task_name, length=16, max_windows=3)
        assert windows.shape == (3, 16) and windows.dtype == np.int32


def test_unprepared_tfds_dataset_gives_a_clear_message(tmp_path):
    task = seqio.Task(
        "lexjax_test.unprepared", seqio.TfdsDataSource(
            "lm1b:1.1.0", tfds_data_dir=str(tmp_path), splits=["test"], read_only=True),
        output_features=tasks.output_features(data.get_vocabulary()),
        preprocessors=list(tasks.LM_PREPROCESSORS))
    with pytest.raises(data.DataError, match="TFDS_DATA_DIR"):
        streams.iter_documents(task, "test")


# ----------------------------------------------------------------------------- SentencePiece


def test_sentencepiece_cli_trains_a_model_the_task_encodes_with(corpus, tmp_path):
    model = str(tmp_path / "spm" / "tiny.model")
    assert train_sentencepiece.main([
        f"--task={data.TEXT_FILES}", "--vocab_size=400", f"--out={model}",
        f"--text_files_glob={corpus.glob}"]) == 0
    processor = spm.SentencePieceProcessor(model_file=model)
    config = data.DataConfig(task=data.TEXT_FILES, text_files_glob=corpus.glob,
                             vocabulary="sentencepiece", sentencepiece_model=model)
    vocabulary = config.seqio_vocabulary()
    assert vocabulary is data.get_vocabulary("sentencepiece", model)  # Built once.
    assert data.vocab_size(vocabulary) == processor.get_piece_size() == 400
    assert (vocabulary.pad_id, vocabulary.eos_id, vocabulary.unk_id) == (0, 1, 2)
    # The task of this config is an unregistered variant named after the model and the glob.
    with open(model, "rb") as f:
        model_hash = hashlib.md5(f.read()).hexdigest()[:12]
    glob_hash = hashlib.sha1(corpus.glob.encode()).hexdigest()[:12]
    assert data.get_task(config).name == f"{data.TEXT_FILES}.spm_{model_hash}.{glob_hash}"
    assert data.get_task(corpus.config).name == f"{data.TEXT_FILES}.byte.{glob_hash}"
    texts = corpus.by_split["test"]
    expected = np.array([i for t in texts for i in processor.encode(t) + [EOS]], np.int32)
    windows = data.eval_windows(config, length=8)
    n = len(expected) // 8
    np.testing.assert_array_equal(windows.reshape(-1), expected[:n * 8])
    assert len(expected) < 0.9 * len(reference_stream(texts))  # Compresses.
    assert vocabulary.decode(processor.encode(texts[0])) == texts[0]  # Lossless.
    assert data.bytes_per_token(config, "test") == \
        pytest.approx(sum(len(t.encode()) for t in texts) / (len(expected) - len(texts)))
    batch = take(data.train_batches(config, length=16, batch_size=2), 1)[0]
    assert batch.shape == (2, 16) and batch.max() < 400
    padded = take(data.train_batches(config, length=16, batch_size=2, pack=False,
                                     shuffle=False), 1)[0]
    train_texts = corpus.by_split["train"]
    first = processor.encode(train_texts[0]) + [EOS]
    np.testing.assert_array_equal(padded, reference_pieces([np.array(first)], 16)[:2])
    # The byte config of the same files still reads bytes.
    np.testing.assert_array_equal(data.eval_windows(corpus.config, length=8).reshape(-1),
                                  corpus.stream("test")[:len(corpus.stream("test")) // 8 * 8])


# ----------------------------------------------------------------------------- bad inputs


def test_unknown_task_lists_the_registered_tasks():
    with pytest.raises(data.DataError, match="unknown task 'lexjax.nope'") as error:
        data.train_batches("lexjax.nope", length=8, batch_size=2)
    for name in [data.STDLIB_CODE, data.TEXT_FILES, *TFDS_TASKS]:
        assert name in str(error.value)


def test_empty_or_missing_glob_is_explained(tmp_path):
    pattern = str(tmp_path / "nothing" / "*.txt")
    config = data.DataConfig(task=data.TEXT_FILES, text_files_glob=pattern)
    with pytest.raises(data.DataError, match="matches no text files") as error:
        data.train_batches(config, length=8, batch_size=2)
    assert pattern in str(error.value) and "TEXT_FILES_GLOB" in str(error.value)
    for no_glob in (data.TEXT_FILES, data.DataConfig(task=data.TEXT_FILES)):
        with pytest.raises(data.DataError, match="needs a glob") as error:
            data.eval_windows(no_glob, length=8)
        assert "TEXT_FILES_GLOB" in str(error.value)
    with pytest.raises(data.DataError, match="needs a glob.*TEXT_FILES_GLOB"):
        data.text_files_corpus(None)


def test_binary_files_are_skipped_and_counted(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("plain text\n")
    (tmp_path / "b.txt").write_bytes(b"caf\xe9 latin-1 is still text")  # invalid UTF-8
    (tmp_path / "c.txt").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR")
    corpus = data.text_files_corpus(str(tmp_path / "*.txt"))
    assert corpus.relpaths == ("a.txt", "b.txt")
    assert "skipped 1 of 3 files" in capsys.readouterr().err
    (tmp_path / "a.txt").write_bytes(b"\0")
    (tmp_path / "b.txt").write_bytes(b"\0")
    with pytest.raises(data.DataError, match="matches no text files"):
        data.text_files_corpus(str(tmp_path / "*.txt"))


def test_empty_and_unknown_splits_are_explained(tmp_path):
    relpath = next(f"only{i}.txt" for i in range(100) if reference_split(f"only{i}.txt") == "train")
    (tmp_path / relpath).write_text("a single training document")
    config = data.DataConfig(task=data.TEXT_FILES, text_files_glob=str(tmp_path / "*.txt"))
    with pytest.raises(data.DataError, match="split 'test' .* is empty"):
        data.eval_windows(config, length=8)
    with pytest.raises(data.DataError, match=r"no split 'dev'.*'validation'"):
        data.train_batches(config, length=8, batch_size=2, split="dev")
    with pytest.raises(data.DataError, match="fewer than one example"):
        data.train_batches(config, length=4096, batch_size=2)
    # Padded, the one document gives one example however long the examples are.
    padded = take(data.train_batches(config, length=4096, batch_size=2, pack=False), 1)[0]
    np.testing.assert_array_equal(
        padded, reference_pieces([reference_stream(["a single training document"])] * 2, 4096))


def test_left_padded_pieces_end_at_the_row_end():
    """`pad_left` (models scored on a row's last positions): the same pieces as right padding,
    the padding moved before them; hand-checked rows and the streaming counterpart."""
    tokens = np.arange(10, 26)  # documents [10..12], [13..16], [17..25]
    starts, ends = packing.document_pieces(np.array([0, 3, 7, 16]), 4)
    left = packing.gather_pieces(tokens, starts, ends, 4, pad_left=True)
    np.testing.assert_array_equal(left, [[PAD, 10, 11, 12], [13, 14, 15, 16], [17, 18, 19, 20],
                                         [21, 22, 23, 24], [PAD, PAD, PAD, 25]])
    right = packing.gather_pieces(tokens, starts, ends, 4)
    for l_row, r_row in zip(left, right):
        np.testing.assert_array_equal(l_row[l_row != PAD], r_row[r_row != PAD])
    documents = [tokens[0:3], tokens[3:7], tokens[7:16]]
    np.testing.assert_array_equal(
        np.stack(list(packing.pad_documents(documents, 4, pad_left=True))), left)
    np.testing.assert_array_equal(data.segment_ids(left)[0], [0, 1, 1, 1])


def test_random_left_crops_are_the_reference_crops():
    """google-research/perceiver-ar @cc756f5, perceiver_ar/dataset_test.py
    `test_minimum_crop_length`: with context 7 and minimum crop 4, 'abcdefg' trains on 'abcd',
    'abcde', 'abcdef' and 'abcdefg' (each at the end of the row, padding first), uniformly."""
    doc = np.arange(2, 9)  # a..g
    rows = np.stack([doc, np.r_[0, 0, 0, 5, 6, 7, 8], np.zeros(7, int)])
    rng = np.random.default_rng(0)
    seen, counts = set(), {}
    for _ in range(2000):
        out = packing.random_left_crops(rows, 4, rng.random(3))
        seen.add(tuple(out[0]))
        counts[int(np.sum(out[0] > 0))] = counts.get(int(np.sum(out[0] > 0)), 0) + 1
        np.testing.assert_array_equal(out[1], rows[1])  # 4 tokens: at the minimum already
        np.testing.assert_array_equal(out[2], rows[2])  # an empty row stays empty
    want = {tuple(np.r_[np.zeros(7 - e, int), doc[:e]]) for e in range(4, 8)}
    assert seen == want
    assert all(abs(c / 2000 - 0.25) < 0.04 for c in counts.values())
    short = packing.random_left_crops(rows[1:2], 0, np.random.default_rng(1).random(1))
    assert np.sum(short > 0) >= 1 and short[0, -1] > 0  # at least one token, at the end
