"""Tests of the classification data (`lexjax.data.classification`, the classification tasks of
`lexjax.data.tasks`, labelled `streams.materialized_stream`) against independent references.

`lexjax.stdlib_is_test` reads a small fake standard library written to a temporary directory
(`corpora.stdlib_root` is patched to point at it), whose labels are known from how each path was
made; expected rows are rebuilt from the files' bytes (byte id = byte + 3, EOS = 1). GLUE tasks
read TFDS mock data (offline): examples made here per (config, split), so the expected texts,
labels and the TFDS split each task split reads are known. Every test caches token streams under
a temporary directory, so mock data never reaches a real cache.
"""
from __future__ import annotations

import hashlib
import os

import lexjax.data as data  # First: it sets TensorFlow's quiet, CPU-only defaults before TF loads.
from lexjax.data import corpora, streams, tasks

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

LENGTH = 32
EOS = 1
PAD = 0
GLUE_NAMES = ("cola", "sst2", "mrpc", "qqp", "mnli", "qnli", "rte")
#: The GLUE class names, as TFDS's `glue` builder defines them (by label id).
GLUE_LABELS = {
    "cola": ("unacceptable", "acceptable"), "sst2": ("negative", "positive"),
    "mrpc": ("not_equivalent", "equivalent"), "qqp": ("not_duplicate", "duplicate"),
    "mnli": ("entailment", "neutral", "contradiction"),
    "qnli": ("entailment", "not_entailment"), "rte": ("entailment", "not_entailment"),
}


def reference_split(relpath: str) -> str:
    u = int(hashlib.sha1(relpath.encode("utf-8")).hexdigest()[:16], 16) / 2**64
    return "train" if u < 0.90 else "validation" if u < 0.95 else "test"


def reference_tokens(text: bytes) -> np.ndarray:
    """A document's byte tokens with EOS; invalid UTF-8 is read as U+FFFD."""
    valid = text.decode("utf-8", errors="replace").encode("utf-8")
    return np.array([b + 3 for b in valid] + [EOS], np.int32)


def padded(piece: np.ndarray, length: int) -> np.ndarray:
    return np.concatenate([piece, np.full(length - len(piece), PAD, np.int32)])


def decode(row: np.ndarray) -> bytes:
    return bytes(int(t) - 3 for t in row if t > EOS)


def with_labels(rows: dict) -> np.ndarray:
    """`[E, L + 1]`: each row's inputs and label, sorted, to compare sets of examples."""
    a = np.concatenate([rows["inputs"], rows["label"][:, None]], axis=1)
    return a[np.lexsort(a.T[::-1])]


def take(iterator, n: int) -> list[dict]:
    batches = [next(iterator) for _ in range(n)]
    iterator.close()
    return batches


pytestmark = pytest.mark.usefixtures("isolated_data_cache")


# ----------------------------------------------------------------------------- stdlib_is_test


class FakeStdlib:
    """A directory of .py files laid out like a standard library, with each file's label (1: in
    a test-suite directory) known from the template that made its path."""

    def __init__(self, root: str):
        self.root = root
        self.files: dict[str, bytes] = {}
        self.labels: dict[str, int] = {}
        rng = np.random.default_rng(0)
        templates = [  # (path template, label)
            ("mod{i}.py", 0), ("pkg{k}/mod{i}.py", 0), ("pkg{k}/sub/mod{i}.py", 0),
            ("unittest/case{i}.py", 0), ("pkg{k}/test.py", 0),  # a file named test, no dir
            ("test_mod{i}.py", 0), ("testing{k}/util{i}.py", 0),
            ("test/test_mod{i}.py", 1), ("test/support/helper{i}.py", 1),
            ("pkg{k}/tests/test_{i}.py", 1), ("idlelib/idle_test/test_{i}.py", 1),
            ("pkg{k}/tests/data/sample{i}.py", 1),
        ]
        words = ["def", "f(x):", "return", "x", "import", "os", "class", "A:", "pass", "#", "é",
                 "漢字", "\n", "\n    ", "=", "1"]
        i = 0
        while True:
            template, label = templates[i % len(templates)]
            relpath = template.format(i=i, k=i % 3)
            if relpath not in self.files:
                n = int(rng.integers(1, 60))
                self.files[relpath] = (f"# {relpath}\n" + " ".join(rng.choice(words, n))).encode()
                self.labels[relpath] = label
            i += 1
            test = [p for p in self.files if reference_split(p) == "test"]
            sizes = [len(self.files[p]) for p in test]
            if (i > 150 and sum(self.labels[p] == 0 for p in test) >= 2
                    and sum(self.labels[p] == 1 for p in test) >= 2
                    and min(sizes) < LENGTH - 1 and max(sizes) > 3 * LENGTH):
                break
        self.files["legacy/latin1.py"] = b"# caf\xe9 -- not UTF-8\nx = 1\n"  # read as U+FFFD
        self.labels["legacy/latin1.py"] = 0
        for relpath, text in self.files.items():
            self._write(relpath, text)
        # What the corpus skips (compiled caches and third-party code).
        self._write("__pycache__/mod0.py", b"skipped")
        self._write("site-packages/third/party.py", b"skipped")
        self._write("pkg0/README.txt", b"not python")

    def _write(self, relpath: str, text: bytes) -> None:
        path = os.path.join(self.root, *relpath.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(text)

    def relpaths(self, split: str) -> list[str]:
        return sorted(p for p in self.files if reference_split(p) == split)

    def documents(self, split: str) -> list[np.ndarray]:
        return [reference_tokens(self.files[p]) for p in self.relpaths(split)]

    def label_list(self, split: str) -> list[int]:
        return [self.labels[p] for p in self.relpaths(split)]

    def examples(self, split: str, length: int) -> tuple[np.ndarray, np.ndarray]:
        """Every piece of `length` tokens of every document, padded, with its document's label."""
        rows, labels = [], []
        for document, label in zip(self.documents(split), self.label_list(split)):
            for start in range(0, len(document), length):
                rows.append(padded(document[start:start + length], length))
                labels.append(label)
        return np.stack(rows), np.array(labels, np.int32)


@pytest.fixture(scope="module")
def stdlib(tmp_path_factory) -> FakeStdlib:
    """The fake standard library, which `corpora.stdlib_corpus()` reads while the module runs."""
    fake = FakeStdlib(str(tmp_path_factory.mktemp("stdlib")))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(corpora, "stdlib_root", lambda: fake.root)
        yield fake


IS_TEST = data.DataConfig(task=tasks.STDLIB_IS_TEST)


def test_fake_stdlib_is_what_the_corpus_reads(stdlib):
    corpus = corpora.stdlib_corpus()
    assert corpus.root == stdlib.root
    assert corpus.relpaths == tuple(sorted(stdlib.files))  # skipped dirs and non-.py excluded
    assert tasks.local_corpus(IS_TEST) == corpus
    for relpath, label in stdlib.labels.items():
        assert int(corpora.is_test_suite(relpath)) == label, relpath
    assert tasks.has_labels(tasks.STDLIB_IS_TEST) and tasks.is_local(tasks.STDLIB_IS_TEST)


@pytest.mark.parametrize("split", data.SPLITS)
def test_stdlib_is_test_stream_has_the_files_and_their_labels(stdlib, split):
    stream = streams.materialized_stream(IS_TEST, split)
    relpaths = corpora.stdlib_corpus().relpaths_of(split)
    assert relpaths == stdlib.relpaths(split)
    assert stream.num_documents == len(relpaths)
    assert stream.labels.dtype == np.int32
    np.testing.assert_array_equal(stream.labels,
                                  [int(corpora.is_test_suite(p)) for p in relpaths])
    np.testing.assert_array_equal(stream.labels, stdlib.label_list(split))
    documents = stdlib.documents(split)
    np.testing.assert_array_equal(stream.tokens, np.concatenate(documents))
    np.testing.assert_array_equal(stream.doc_starts, np.cumsum([0] + [len(d) for d in documents]))
    # Read back from the cache: the same stream, labels included.
    again = streams.materialized_stream(IS_TEST, split)
    np.testing.assert_array_equal(again.labels, stream.labels)
    np.testing.assert_array_equal(again.tokens, stream.tokens)
    if split == "test":
        assert set(stream.labels.tolist()) == {0, 1}


def test_stdlib_is_test_rows_are_the_document_pieces(stdlib):
    want_rows, want_labels = stdlib.examples("test", LENGTH)
    rows = data.classification_examples(IS_TEST, length=LENGTH, split="test")
    assert set(rows) == {"inputs", "segment_ids", "label"}
    assert rows["inputs"].dtype == rows["segment_ids"].dtype == rows["label"].dtype == np.int32
    assert rows["inputs"].shape == rows["segment_ids"].shape == (len(want_rows), LENGTH)
    np.testing.assert_array_equal(rows["inputs"], want_rows)
    np.testing.assert_array_equal(rows["label"], want_labels)
    np.testing.assert_array_equal(rows["segment_ids"], (rows["inputs"] != PAD).astype(np.int32))
    # Padding only after the text; a padded row ends its document.
    n = (rows["inputs"] != PAD).sum(axis=1)
    assert (n > 0).all()
    assert ((rows["inputs"] != PAD) == (np.arange(LENGTH) < n[:, None])).all()
    assert (rows["inputs"][n < LENGTH, n[n < LENGTH] - 1] == EOS).all()
    # Labels are repeated once per piece of a document: long documents give several rows.
    pieces = [-(-len(d) // LENGTH) for d in stdlib.documents("test")]
    assert max(pieces) > 1
    np.testing.assert_array_equal(rows["label"], np.repeat(stdlib.label_list("test"), pieces))
    # A few rows checked straight against the file bytes.
    first_of = np.cumsum([0] + pieces)
    for doc, relpath in enumerate(stdlib.relpaths("test")[:3]):
        with open(os.path.join(stdlib.root, *relpath.split("/")), "rb") as f:
            tokens = [b + 3 for b in f.read()] + [EOS]
        row = rows["inputs"][first_of[doc]]
        np.testing.assert_array_equal(row[:min(LENGTH, len(tokens))], tokens[:LENGTH])
    np.testing.assert_array_equal(
        data.class_counts(IS_TEST, length=LENGTH, split="test"),
        np.bincount(want_labels, minlength=2))


def test_invalid_utf8_file_is_read_with_replacement(stdlib):
    split = reference_split("legacy/latin1.py")
    stream = streams.materialized_stream(IS_TEST, split)
    doc = stdlib.relpaths(split).index("legacy/latin1.py")
    text = bytes(int(t) - 3 for t in
                 stream.tokens[stream.doc_starts[doc]:stream.doc_starts[doc + 1] - 1])
    assert text == "# caf\ufffd -- not UTF-8\nx = 1\n".encode("utf-8")


def test_max_examples_spread_over_the_split(stdlib):
    full = data.classification_examples(IS_TEST, length=LENGTH, split="test")
    num = len(full["label"])
    k = max(2, num // 3)
    assert k < num
    some = data.classification_examples(IS_TEST, length=LENGTH, split="test", max_examples=k)
    assert some["inputs"].shape == (k, LENGTH) and some["label"].shape == (k,)
    # The rows are a subsequence of the split's rows, from the first to the last, evenly spaced.
    picked, j = [], 0
    for row, label in zip(some["inputs"], some["label"]):
        while not (np.array_equal(full["inputs"][j], row) and full["label"][j] == label):
            j += 1
        picked.append(j)
        j += 1
    gaps = np.diff(picked)
    assert picked[0] == 0 and picked[-1] == num - 1
    assert gaps.max() - gaps.min() <= 1
    np.testing.assert_array_equal(some["segment_ids"], full["segment_ids"][picked])
    # Enough allowed: all of them.
    every = data.classification_examples(IS_TEST, length=LENGTH, split="test",
                                         max_examples=num + 5)
    np.testing.assert_array_equal(every["inputs"], full["inputs"])


def test_stdlib_is_test_batches_are_a_function_of_seed_and_step(stdlib):
    want_rows, want_labels = stdlib.examples("train", LENGTH)
    num, batch_size = len(want_labels), 4
    kwargs = dict(length=LENGTH, batch_size=batch_size, seed=3)
    steps = -(-num // batch_size)
    straight = take(data.classification_batches(IS_TEST, **kwargs), steps + 2)
    for batch in straight:
        assert batch["inputs"].shape == batch["segment_ids"].shape == (batch_size, LENGTH)
        assert batch["label"].shape == (batch_size,)
        assert batch["inputs"].dtype == batch["label"].dtype == np.int32
        np.testing.assert_array_equal(batch["segment_ids"], batch["inputs"] != PAD)
    # One epoch visits every example of the train split once, each with its label.
    epoch = {key: np.concatenate([b[key] for b in straight])[:num] for key in ("inputs", "label")}
    np.testing.assert_array_equal(with_labels(epoch),
                                  with_labels({"inputs": want_rows, "label": want_labels}))
    # The same (seed, step) gives the same batch; another step or seed another one.
    again = take(data.classification_batches(IS_TEST, **kwargs), 3)
    for got, want in zip(again, straight):
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    assert not np.array_equal(straight[0]["inputs"], straight[1]["inputs"])
    other = take(data.classification_batches(IS_TEST, length=LENGTH, batch_size=batch_size,
                                             seed=4), 1)[0]
    assert not np.array_equal(other["inputs"], straight[0]["inputs"])
    # Resuming at step k gives batch k; two host shards concatenate to the global batch.
    for start in (1, steps - 1, steps):
        resumed = take(data.classification_batches(IS_TEST, start_step=start, **kwargs), 2)
        for got, want in zip(resumed, straight[start:start + 2]):
            for key in want:
                np.testing.assert_array_equal(got[key], want[key])
    shards = [take(data.classification_batches(IS_TEST, shard_index=i, num_shards=2, **kwargs),
                   steps + 2) for i in range(2)]
    for step, want in enumerate(straight):
        for key in want:
            assert shards[0][step][key].shape[0] == batch_size // 2
            np.testing.assert_array_equal(
                np.concatenate([shards[0][step][key], shards[1][step][key]]), want[key])
    with pytest.raises(data.DataError, match="num_shards"):
        next(data.classification_batches(IS_TEST, shard_index=0, num_shards=3, **kwargs))


# ----------------------------------------------------------------------------- GLUE (mock TFDS)


def glue_text_fields(builder) -> list[str]:
    return [k for k, v in builder.info.features.items() if isinstance(v, tfds.features.Text)]


def mock_glue_texts(config: str, split: str, field: str, n: int) -> list[str]:
    """Example i's text of a field: names its config, split and field; lengths vary up to
    several times LENGTH bytes."""
    return [f"{config}/{split}/{field}/{i} é漢" + " ab" * (7 * i % 40) for i in range(n)]


def mock_glue_labels(num_classes: int, n: int) -> list[int]:
    """-1 (GLUE's hidden test label) for example 2, else i % num_classes."""
    return [-1 if i == 2 else i % num_classes for i in range(n)]


class MockGlue:
    """`tfds.testing.mock_data`'s `as_dataset_fn`: deterministic GLUE examples per (config,
    split), recording which (config, split) was read."""

    num_examples = 9

    def __init__(self):
        self.reads: list[tuple[str, str]] = []

    def context(self):
        """`mock_data` replacing `DatasetBuilder._as_dataset` with `self.as_dataset` (a plain
        function: a callable object would not be bound to the builder)."""
        return tfds.testing.mock_data(
            as_dataset_fn=lambda builder, split, **kwargs: self.as_dataset(builder, split))

    def as_dataset(self, builder, split) -> tf.data.Dataset:
        config, split = builder.builder_config.name, str(split)
        self.reads.append((config, split))
        n = self.num_examples
        example = {field: mock_glue_texts(config, split, field, n)
                   for field in glue_text_fields(builder)}
        example["label"] = np.array(
            mock_glue_labels(builder.info.features["label"].num_classes, n), np.int64)
        example["idx"] = np.arange(n, dtype=np.int32)
        return tf.data.Dataset.from_tensor_slices(example)


def expected_glue_rows(config: str, split: str, fields: tuple[str, ...], num_classes: int,
                       length: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `length` tokens of each labelled example, "f1: <t1> f2: <t2>" for pairs."""
    n = MockGlue.num_examples
    texts = [mock_glue_texts(config, split, field, n) for field in fields]
    rows, labels = [], []
    for i, label in enumerate(mock_glue_labels(num_classes, n)):
        if label < 0:
            continue
        if len(fields) == 1:
            text = texts[0][i]
        else:
            text = " ".join(f"{field}: {t[i]}" for field, t in zip(fields, texts))
        tokens = reference_tokens(text.encode("utf-8"))[:length]
        rows.append(padded(tokens, length))
        labels.append(label)
    return np.stack(rows), np.array(labels, np.int32)


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """A cache of this test's own: mock TFDS data is keyed like the real dataset."""
    cache = str(tmp_path / "cache")
    monkeypatch.setenv(data.CACHE_ENV, cache)
    return cache


@pytest.mark.parametrize("name,fields,length", [("sst2", ("sentence",), LENGTH),
                                                ("mrpc", ("sentence1", "sentence2"), 96)])
def test_glue_rows_format_truncate_and_read_validation_for_test(fresh_cache, name, fields,
                                                                length):
    task = f"lexjax.glue_{name}"
    assert tasks.has_labels(task) and not tasks.is_local(task)
    assert tasks.tfds_name(task) == f"glue/{name}:2.0.0"
    info = data.task_info(task)
    assert info.windows == "first" and info.num_classes == 2
    mock = MockGlue()
    with mock.context():
        assert glue_text_fields(tfds.builder(tasks.tfds_name(task))) == list(fields)
        for split, tfds_split in [("test", "validation"), ("validation", "validation"),
                                  ("train", "train")]:
            mock.reads.clear()
            rows = data.classification_examples(task, length=length, split=split)
            assert mock.reads == [(name, tfds_split)]
            want_rows, want_labels = expected_glue_rows(name, tfds_split, fields, 2, length)
            np.testing.assert_array_equal(rows["inputs"], want_rows)
            np.testing.assert_array_equal(rows["label"], want_labels)
            np.testing.assert_array_equal(rows["segment_ids"], rows["inputs"] != PAD)
        # Every labelled example gives exactly one row: long ones are truncated (no EOS).
        n = (rows["inputs"] != PAD).sum(axis=1)
        assert len(rows["label"]) == MockGlue.num_examples - 1  # the -1 label is dropped
        assert (n == length).sum() >= 3 and (n < length).any()
        assert not (rows["inputs"][n == length] == EOS).any()
        texts = [decode(row) for row in rows["inputs"]]
        if len(fields) == 1:
            assert all(t.startswith(f"{name}/train/sentence/".encode()) for t in texts)
        else:
            short = [t for t, k in zip(texts, n) if k < length]
            assert short and all(re_pair(t, name) for t in short)
        batch = take(data.classification_batches(task, length=length, batch_size=4, seed=0),
                     1)[0]
        assert batch["inputs"].shape == (4, length) and set(batch["label"].tolist()) <= {0, 1}
    assert data.class_counts(task, length=length, split="test").sum() == \
        MockGlue.num_examples - 1  # from the cache, outside the mock


def re_pair(text: bytes, name: str) -> bool:
    s1, s2 = f"{name}/train/sentence1/", f"{name}/train/sentence2/"
    return (text.startswith(f"sentence1: {s1}".encode())
            and f" sentence2: {s2}".encode() in text)


def test_glue_mnli_test_reads_validation_matched(fresh_cache):
    mock = MockGlue()
    with mock.context():
        rows = data.classification_examples("lexjax.glue_mnli", length=LENGTH, split="test")
    assert mock.reads == [("mnli", "validation_matched")]
    want_rows, want_labels = expected_glue_rows(
        "mnli", "validation_matched", ("premise", "hypothesis"), 3, LENGTH)
    np.testing.assert_array_equal(rows["inputs"], want_rows)
    np.testing.assert_array_equal(rows["label"], want_labels)
    assert set(want_labels.tolist()) == {0, 1, 2}


@pytest.mark.parametrize("name", ["sst2", "mrpc"])
def test_glue_on_tfds_random_mock_data(fresh_cache, name):
    """TFDS's own random examples: rows are the formatted, truncated texts TFDS yields."""
    task = f"lexjax.glue_{name}"
    length = 24
    with tfds.testing.mock_data(num_examples=6):
        examples = list(tfds.load(tasks.tfds_name(task), split="validation").as_numpy_iterator())
        rows = data.classification_examples(task, length=length, split="test")
    assert len(rows["label"]) == len(examples) == 6
    assert set(rows["label"].tolist()) <= {0, 1}
    for row, label, ex in zip(rows["inputs"], rows["label"], examples):
        if name == "sst2":
            text = ex["sentence"]
        else:
            text = b"sentence1: " + ex["sentence1"] + b" sentence2: " + ex["sentence2"]
        tokens = reference_tokens(text)[:length]
        np.testing.assert_array_equal(row, padded(tokens, length))
        assert label == ex["label"]


def test_glue_metadata_matches_the_tfds_builders():
    with tfds.testing.mock_data():
        for name in GLUE_NAMES:
            task = f"lexjax.glue_{name}"
            builder = tfds.builder(tasks.tfds_name(task))
            assert data.task_info(task).labels == GLUE_LABELS[name] == \
                tuple(builder.info.features["label"].names)
            glue = next(g for g in tasks.GLUE_TASKS if g.task_name == task)
            assert list(glue.fields) == glue_text_fields(builder)
            assert glue.splits["test"] == ("validation_matched" if name == "mnli"
                                           else "validation")


# ----------------------------------------------------------------------------- metadata


def test_classification_tasks_are_the_labelled_tasks():
    labelled = {name for name in data.task_names() if tasks.has_labels(name)}
    assert set(data.CLASSIFICATION_TASKS) == labelled | set(data.IMAGE_TASKS)  # + images
    assert labelled == {tasks.STDLIB_IS_TEST, *(f"lexjax.glue_{n}" for n in GLUE_NAMES)}
    assert data.task_info(tasks.STDLIB_IS_TEST).windows == "all"
    assert data.task_info(tasks.STDLIB_IS_TEST).labels == ("library", "test suite")
    assert data.task_info("lexjax.glue_mnli").num_classes == 3


@pytest.mark.parametrize("task", [data.STDLIB_CODE, "lexjax.pg19", "lexjax.nope"])
def test_task_info_of_another_task_names_the_classification_tasks(task):
    with pytest.raises(data.DataError, match="not a classification task") as error:
        data.task_info(task)
    for name in data.CLASSIFICATION_TASKS:
        assert name in str(error.value)
    with pytest.raises(data.DataError, match="not a classification task"):
        data.classification_examples(task, length=LENGTH)
