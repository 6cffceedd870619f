"""Tests of lexjax.data against independent references.

Most tests use a small `lexjax.text_files` corpus written to a temporary directory; its expected
token stream is rebuilt here from the files' bytes (byte id = byte + 3, EOS = 1) and the expected
splits from SHA-1 directly, without going through the code under test.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import shutil

import lexjax.data as data  # First: it sets TensorFlow's quiet, CPU-only defaults before TF loads.
from lexjax.data import streams, tasks, train_sentencepiece

import gin
import numpy as np
import pytest
import sentencepiece as spm
import seqio
import tensorflow_datasets as tfds

LENGTH = 32
EOS = 1
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


def sorted_rows(a: np.ndarray) -> np.ndarray:
    return a[np.lexsort(a.T[::-1])]


_scopes = itertools.count()


@contextlib.contextmanager
def gin_bindings(*bindings: str):
    """Applies gin bindings in a fresh scope, leaving the global gin config untouched."""
    scope = f"lexjax_test_data_{next(_scopes)}"
    with gin.unlock_config():
        gin.parse_config([f"{scope}/{binding}" for binding in bindings])
    with gin.config_scope(scope):
        yield


class TextCorpus:
    """A corpus written to disk, with the texts of each split in sorted relative-path order."""

    def __init__(self, root: str, texts: dict[str, str]):
        self.root = root
        self.glob = os.path.join(root, "**", "*.txt")
        self.texts = texts
        self.by_split = {s: [texts[p] for p in sorted(texts) if reference_split(p) == s]
                         for s in data.SPLITS}

    def stream(self, split: str) -> np.ndarray:
        return reference_stream(self.by_split[split])


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


@pytest.fixture(scope="module", autouse=True)
def data_cache(tmp_path_factory):
    """Every test caches token streams under a temporary directory, via $LEXJAX_DATA_CACHE."""
    cache = str(tmp_path_factory.mktemp("cache"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(data.CACHE_ENV, cache)
        yield cache


@pytest.fixture(scope="module")
def corpus_files(tmp_path_factory) -> TextCorpus:
    return write_corpus(str(tmp_path_factory.mktemp("corpus")))


@pytest.fixture
def corpus(corpus_files):
    """The corpus, bound as the glob of lexjax.text_files."""
    with gin_bindings(f"lexjax.data.text_files_glob.pattern = {corpus_files.glob!r}"):
        yield corpus_files


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


def test_text_file_splits_do_not_depend_on_location(corpus_files, tmp_path):
    here = data.text_files_corpus(corpus_files.glob)
    moved_root = str(tmp_path / "elsewhere")
    shutil.copytree(corpus_files.root, moved_root)
    moved = data.text_files_corpus(os.path.join(moved_root, "**", "*.txt"))
    assert here.relpaths == moved.relpaths == tuple(sorted(corpus_files.texts))
    for split in data.SPLITS:
        assert here.relpaths_of(split) == moved.relpaths_of(split)
        assert [open(f, encoding="utf-8").read() for f in here.files(split)] == \
            corpus_files.by_split[split]


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


def test_vocabulary_kind_by_gin_and_errors(tmp_path):
    with gin_bindings("lexjax.data.vocabulary.kind = 'sentencepiece'"):
        with pytest.raises(data.DataError, match="sentencepiece_model"):
            data.get_vocabulary()
    with gin_bindings("lexjax.data.vocabulary.kind = 'wordpiece'"):
        with pytest.raises(data.DataError, match="'byte', 'sentencepiece'"):
            data.get_vocabulary()
    with pytest.raises(data.DataError, match="train_sentencepiece"):
        data.get_vocabulary("sentencepiece", str(tmp_path / "missing.model"))


def test_gin_files_parse():
    # Gin files bind globally, so this test (like the CLI's) clears the global config after.
    configs = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "data")
    gin.clear_config()
    try:
        gin.parse_config_files_and_bindings(
            [os.path.join(configs, "text_files.gin"), os.path.join(configs, "sentencepiece.gin")],
            ["TEXT_FILES_GLOB = '/corpus/*.txt'", "SENTENCEPIECE_MODEL = '/m.model'"],
            finalize_config=False)
        assert data.text_files_glob() == "/corpus/*.txt"
        assert gin.query_parameter("lexjax.data.vocabulary.kind") == "sentencepiece"
    finally:
        gin.clear_config()


# ----------------------------------------------------------------------------- training batches


def test_packing_is_exact(corpus):
    expected = corpus.stream("train")
    num_examples = len(expected) // LENGTH
    batch_size = 8
    steps = -(-num_examples // batch_size) + 2  # One epoch and a bit of the next.
    rows = np.concatenate(take(data.train_batches(
        data.TEXT_FILES, length=LENGTH, batch_size=batch_size, shuffle=False), steps))
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
        data.TEXT_FILES, length=LENGTH, batch_size=batch_size, seed=3), steps))
    epoch0, epoch1 = rows[:num_examples], rows[num_examples:2 * num_examples]
    np.testing.assert_array_equal(sorted_rows(epoch0), sorted_rows(expected))
    np.testing.assert_array_equal(sorted_rows(epoch1), sorted_rows(expected))
    assert not np.array_equal(epoch0, expected)  # Shuffled...
    assert not np.array_equal(epoch0, epoch1)  # ...differently each epoch.


def test_order_is_deterministic_per_seed(corpus):
    def first(seed):
        return np.stack(take(data.train_batches(
            data.TEXT_FILES, length=LENGTH, batch_size=4, seed=seed), 5))
    np.testing.assert_array_equal(first(0), first(0))
    assert not np.array_equal(first(0), first(1))


def test_start_step_resumes_the_stream(corpus):
    num_examples = len(corpus.stream("train")) // LENGTH
    # Not a divisor of the number of examples, so that some batches straddle two epochs.
    batch_size = next(b for b in (5, 6, 7, 9, 11) if num_examples % b)
    steps_per_epoch = num_examples // batch_size
    uninterrupted = take(data.train_batches(
        data.TEXT_FILES, length=LENGTH, batch_size=batch_size, seed=7), 2 * steps_per_epoch + 4)
    for start in (0, 1, steps_per_epoch, steps_per_epoch + 1, 2 * steps_per_epoch):
        resumed = take(data.train_batches(data.TEXT_FILES, length=LENGTH, batch_size=batch_size,
                                          seed=7, start_step=start), 3)
        for got, want in zip(resumed, uninterrupted[start:start + 3]):
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("num_shards", [2, 4])
def test_host_shards_partition_the_global_batch(corpus, num_shards):
    kwargs = dict(length=LENGTH, batch_size=8, seed=1, start_step=3)
    global_batches = take(data.train_batches(data.TEXT_FILES, **kwargs), 40)
    shards = [take(data.train_batches(data.TEXT_FILES, shard_index=i, num_shards=num_shards,
                                      **kwargs), 40) for i in range(num_shards)]
    for step, want in enumerate(global_batches):
        got = np.concatenate([shard[step] for shard in shards])
        assert shards[0][step].shape == (8 // num_shards, LENGTH)
        np.testing.assert_array_equal(got, want)


# ----------------------------------------------------------------------------- row streams


def test_row_streams_continue_segment_after_segment(corpus):
    """Row i of batch k + 1 continues row i of batch k inside an epoch; each epoch's rows are the
    B row streams of the stream (each E * L tokens), reassigned to rows by a seeded order."""
    expected = corpus.stream("train")
    batch_size = 4
    segments = data.stream_segments(data.TEXT_FILES, length=LENGTH, batch_size=batch_size)
    assert segments == len(expected) // batch_size // LENGTH
    rows = np.stack(take(data.stream_batches(data.TEXT_FILES, length=LENGTH,
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
    segments = data.stream_segments(data.TEXT_FILES, length=LENGTH, batch_size=4)
    straight = take(data.stream_batches(data.TEXT_FILES, **kwargs), segments + 3)
    for start in (1, segments - 1, segments):
        resumed = take(data.stream_batches(data.TEXT_FILES, start_step=start, **kwargs), 3)
        for got, want in zip(resumed, straight[start:start + 3]):
            np.testing.assert_array_equal(got, want)
    halves = [take(data.stream_batches(data.TEXT_FILES, shard_index=i, num_shards=2, **kwargs),
                   segments + 3) for i in range(2)]
    for step, want in enumerate(straight):
        np.testing.assert_array_equal(np.concatenate([h[step] for h in halves]), want)


def test_row_streams_need_enough_tokens_and_a_local_task(corpus):
    with pytest.raises(data.DataError, match="fewer than one segment"):
        data.stream_segments(data.TEXT_FILES, length=len(corpus.stream("train")), batch_size=2)
    with pytest.raises(data.DataError, match="local task"):
        data.stream_segments("lexjax.pg19", length=LENGTH, batch_size=2)


# ----------------------------------------------------------------------------- evaluation


def test_eval_windows_cut_the_test_stream(corpus):
    expected = corpus.stream("test")
    n = len(expected) // LENGTH
    windows = data.eval_windows(data.TEXT_FILES, length=LENGTH)
    assert windows.dtype == np.int32 and windows.shape == (n, LENGTH)
    np.testing.assert_array_equal(windows.reshape(-1), expected[:n * LENGTH])
    np.testing.assert_array_equal(data.eval_windows(data.TEXT_FILES, length=LENGTH), windows)
    np.testing.assert_array_equal(
        data.eval_windows(data.TEXT_FILES, length=LENGTH, max_windows=2), windows[:2])


def test_eval_windows_respect_documents(corpus):
    expected = []
    for text in corpus.by_split["test"]:
        document = reference_stream([text])
        expected += [document[i:i + LENGTH] for i in range(0, len(document) - LENGTH + 1, LENGTH)]
    windows = data.eval_windows(data.TEXT_FILES, length=LENGTH, respect_documents=True)
    np.testing.assert_array_equal(windows, np.stack(expected))
    assert (windows[:, :-1] != EOS).all()  # EOS only ever ends a window: no boundary inside.
    # With longer windows some documents are too short to give any, and are dropped.
    sizes = [len(t.encode("utf-8")) + 1 for t in corpus.by_split["test"]]
    assert min(sizes) < 4 * LENGTH <= max(sizes)
    long_windows = data.eval_windows(data.TEXT_FILES, length=4 * LENGTH, respect_documents=True)
    assert len(long_windows) == sum(size // (4 * LENGTH) for size in sizes)


def test_bytes_per_token_of_bytes_is_one(corpus):
    assert data.bytes_per_token(data.TEXT_FILES, "test") == 1.0


def test_stdlib_code_task_smoke():
    windows = data.eval_windows(data.STDLIB_CODE, length=256, max_windows=4,
                                respect_documents=True)
    assert windows.shape == (4, 256)
    text = bytes(int(t) - 3 for t in windows[0]).decode("utf-8", errors="replace")
    assert "import" in text or "def " in text


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


def test_sentencepiece_cli_trains_a_model_the_task_encodes_with(corpus_files, tmp_path):
    model = str(tmp_path / "spm" / "tiny.model")
    assert train_sentencepiece.main([
        f"--task={data.TEXT_FILES}", "--vocab_size=400", f"--out={model}",
        f"--text_files_glob={corpus_files.glob}"]) == 0
    try:
        processor = spm.SentencePieceProcessor(model_file=model)
        vocabulary = data.get_vocabulary("sentencepiece", model)
        assert data.vocab_size(vocabulary) == processor.get_piece_size() == 400
        assert (vocabulary.pad_id, vocabulary.eos_id, vocabulary.unk_id) == (0, 1, 2)
        texts = corpus_files.by_split["test"]
        expected = np.array([i for t in texts for i in processor.encode(t) + [EOS]], np.int32)
        windows = data.eval_windows(data.TEXT_FILES, length=8, vocabulary=vocabulary)
        n = len(expected) // 8
        np.testing.assert_array_equal(windows.reshape(-1), expected[:n * 8])
        assert len(expected) < 0.9 * len(reference_stream(texts))  # Compresses.
        assert vocabulary.decode(processor.encode(texts[0])) == texts[0]  # Lossless.
        assert data.bytes_per_token(data.TEXT_FILES, "test", vocabulary=vocabulary) == \
            pytest.approx(sum(len(t.encode()) for t in texts) / (len(expected) - len(texts)))
        batch = take(data.train_batches(data.TEXT_FILES, length=16, batch_size=2,
                                        vocabulary=vocabulary), 1)[0]
        assert batch.shape == (2, 16) and batch.max() < 400
    finally:
        gin.clear_config()


# ----------------------------------------------------------------------------- bad inputs


def test_unknown_task_lists_the_registered_tasks():
    with pytest.raises(data.DataError, match="unknown task 'lexjax.nope'") as error:
        data.train_batches("lexjax.nope", length=8, batch_size=2)
    for name in [data.STDLIB_CODE, data.TEXT_FILES, *TFDS_TASKS]:
        assert name in str(error.value)


def test_empty_or_missing_glob_is_explained(tmp_path):
    pattern = str(tmp_path / "nothing" / "*.txt")
    with gin_bindings(f"lexjax.data.text_files_glob.pattern = {pattern!r}"):
        with pytest.raises(data.DataError, match="matches no files") as error:
            data.train_batches(data.TEXT_FILES, length=8, batch_size=2)
        assert pattern in str(error.value) and "text_files_glob.pattern" in str(error.value)
    with gin_bindings():
        with pytest.raises(data.DataError, match="needs a glob"):
            data.eval_windows(data.TEXT_FILES, length=8)


def test_empty_and_unknown_splits_are_explained(tmp_path):
    relpath = next(f"only{i}.txt" for i in range(100) if reference_split(f"only{i}.txt") == "train")
    (tmp_path / relpath).write_text("a single training document")
    with gin_bindings(f"lexjax.data.text_files_glob.pattern = {str(tmp_path / '*.txt')!r}"):
        with pytest.raises(data.DataError, match="split 'test' .* is empty"):
            data.eval_windows(data.TEXT_FILES, length=8)
        with pytest.raises(data.DataError, match=r"no split 'dev'.*'validation'"):
            data.train_batches(data.TEXT_FILES, length=8, batch_size=2, split="dev")
        with pytest.raises(data.DataError, match="fewer than one example"):
            data.train_batches(data.TEXT_FILES, length=4096, batch_size=2)
