"""The seqio tasks of lexjax: one per corpus, each yielding {"targets": int32 tokens + EOS}
(classification tasks add {"label": int32}).

Every task reads its corpus as examples with a "text" feature and then runs the same
language-model preprocessing: "text" -> "targets", tokenize (keeping the text as
"targets_pretokenized"), append EOS. One example is one document (a source file, a book, an
article, a sentence for lm1b).

    task                corpus                               text field     splits
    lexjax.stdlib_code  the Python standard library (local)  file content   train/validation/test
    lexjax.text_files   local files matching a glob          file content   train/validation/test
    lexjax.pg19         tfds pg19:0.1.1                      book_text      train/validation/test
    lexjax.wiki40b_en   tfds wiki40b/en:1.3.0                text           train/validation/test
    lexjax.c4_en        tfds c4/en:3.1.0                     text           train/validation (*)
    lexjax.arxiv        tfds scientific_papers/arxiv:1.1.1   article        train/validation/test
    lexjax.lm1b         tfds lm1b:1.1.0                      text           train/test (*)

    classification (documents with a label; `lexjax.data.classification` has their metadata):
    lexjax.stdlib_is_test  the standard library (local): is a file test-suite code?  0/1
    lexjax.glue_<name>     tfds glue/<name>:2.0.0 (cola, sst2, mrpc, qqp, mnli, qnli, rte),
                           pairs written "sentence1: ... sentence2: ..."; "test" reads GLUE's
                           validation split (GLUE's test labels are hidden; mnli: matched)

(*) C4 publishes no test split and lm1b no validation split: "test" of lexjax.c4_en reads C4's
validation split and "validation" of lexjax.lm1b reads lm1b's test split, so evaluation code can
always ask for "test" (and monitoring for "validation"). wiki40b text keeps its structure markers
(`_START_ARTICLE_`, `_START_PARAGRAPH_`, `_NEWLINE_`), as in the wiki40b paper's language models.

The local tasks split files by path hash (see `corpora.py`); their text is made valid UTF-8
(invalid bytes become U+FFFD, as `bytes.decode(errors="replace")` does) so every vocabulary sees
the same text. TFDS tasks never download: prepare the dataset elsewhere (`tfds build pg19`) and
point `TFDS_DATA_DIR` at it.

Tasks are registered with the byte vocabulary (the text_files task with no glob: reading it asks
for one). `get_task(data)` returns the task a `DataConfig` describes: the registered one, or an
unregistered copy named "<name>.<vocabulary id>[.<glob hash>]" for another vocabulary or glob.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
from typing import Callable, Mapping, Sequence, Union

import seqio
import tensorflow as tf

from lexjax.data import corpora
from lexjax.data.config import DataConfig, as_data_config
from lexjax.data.errors import DataError
from lexjax.data.vocab import vocabulary_id

TASK_PREFIX = "lexjax."
STDLIB_CODE = "lexjax.stdlib_code"
TEXT_FILES = "lexjax.text_files"
STDLIB_IS_TEST = "lexjax.stdlib_is_test"

#: Preprocessing shared by every task, applied to examples with a "text" feature.
LM_PREPROCESSORS: tuple[Callable[..., tf.data.Dataset], ...] = (
    functools.partial(seqio.preprocessors.rekey, key_map={"targets": "text"}),
    seqio.preprocessors.tokenize,
    seqio.preprocessors.append_eos,
)
#: The same for classification tasks (examples with "text" and "label").
CLASSIFICATION_PREPROCESSORS: tuple[Callable[..., tf.data.Dataset], ...] = (
    functools.partial(seqio.preprocessors.rekey, key_map={"targets": "text", "label": "label"}),
    *LM_PREPROCESSORS[1:],
)


def output_features(vocabulary: seqio.Vocabulary, labelled: bool = False
                    ) -> dict[str, seqio.Feature]:
    """The "targets" feature of every lexjax task, int32 tokens followed by EOS, and the int32
    scalar "label" of a classification task."""
    features = {"targets": seqio.Feature(vocabulary, add_eos=True, dtype=tf.int32)}
    if labelled:
        features["label"] = seqio.Feature(seqio.PassThroughVocabulary(size=0), add_eos=False,
                                          dtype=tf.int32, rank=0, required=False)
    return features


# ----------------------------------------------------------------------------- local corpora


def _read_text(path: tf.Tensor, label: tf.Tensor | None = None) -> dict[str, tf.Tensor]:
    text = tf.strings.unicode_transcode(
        tf.io.read_file(path), input_encoding="UTF-8", output_encoding="UTF-8", errors="replace")
    return {"text": text} if label is None else {"text": text, "label": label}


def local_dataset_fn(corpus_fn: Callable[[], corpora.Corpus],
                     label_fn: Callable[[str], int] | None = None):
    """A seqio dataset_fn reading the files of `corpus_fn()`'s split as {"text": tf.string}, plus
    {"label": int32} = `label_fn(relative path)` for a classification task.

    `corpus_fn` is called each time a dataset is built (a changed glob or corpus is read anew).
    Files come in sorted relative-path order (shuffled by `seed` when `shuffle_files`).
    """
    def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
        corpus = corpus_fn()
        files = tf.constant(corpus.files(split), dtype=tf.string)
        if label_fn is None:
            ds = tf.data.Dataset.from_tensor_slices(files)
        else:
            labels = [label_fn(p) for p in corpus.relpaths_of(split)]
            ds = tf.data.Dataset.from_tensor_slices((files, tf.constant(labels, tf.int32)))
        if shuffle_files and files.shape[0]:
            ds = ds.shuffle(files.shape[0], seed=seed)
        return ds.map(_read_text, num_parallel_calls=tf.data.AUTOTUNE)

    return dataset_fn


# ----------------------------------------------------------------------------- TFDS corpora


@dataclasses.dataclass(frozen=True)
class TfdsCorpus:
    """A TFDS dataset seen as documents.

    Attributes:
      task_name: the seqio task's name.
      tfds_name: "name[/config]:version" as `tfds.builder` takes it.
      text_key: the feature holding a document's text.
      splits: task split -> TFDS split (aliases where the dataset lacks one).
    """
    task_name: str
    tfds_name: str
    text_key: str
    splits: Mapping[str, str]


_TRAIN_VAL_TEST = {"train": "train", "validation": "validation", "test": "test"}
TFDS_CORPORA: tuple[TfdsCorpus, ...] = (
    TfdsCorpus("lexjax.pg19", "pg19:0.1.1", "book_text", _TRAIN_VAL_TEST),
    TfdsCorpus("lexjax.wiki40b_en", "wiki40b/en:1.3.0", "text", _TRAIN_VAL_TEST),
    TfdsCorpus("lexjax.c4_en", "c4/en:3.1.0", "text",
               {"train": "train", "validation": "validation", "test": "validation"}),
    TfdsCorpus("lexjax.arxiv", "scientific_papers/arxiv:1.1.1", "article", _TRAIN_VAL_TEST),
    TfdsCorpus("lexjax.lm1b", "lm1b:1.1.0", "text",
               {"train": "train", "validation": "test", "test": "test"}),
)


@dataclasses.dataclass(frozen=True)
class GlueTask:
    """A GLUE classification task from TFDS: its text fields joined into one "text"."""
    task_name: str
    tfds_name: str
    fields: tuple[str, ...]
    splits: Mapping[str, str]


_GLUE_SPLITS = {"train": "train", "validation": "validation", "test": "validation"}
GLUE_TASKS: tuple[GlueTask, ...] = (
    GlueTask("lexjax.glue_cola", "glue/cola:2.0.0", ("sentence",), _GLUE_SPLITS),
    GlueTask("lexjax.glue_sst2", "glue/sst2:2.0.0", ("sentence",), _GLUE_SPLITS),
    GlueTask("lexjax.glue_mrpc", "glue/mrpc:2.0.0", ("sentence1", "sentence2"), _GLUE_SPLITS),
    GlueTask("lexjax.glue_qqp", "glue/qqp:2.0.0", ("question1", "question2"), _GLUE_SPLITS),
    GlueTask("lexjax.glue_mnli", "glue/mnli:2.0.0", ("premise", "hypothesis"),
             {"train": "train", "validation": "validation_matched",
              "test": "validation_matched"}),
    GlueTask("lexjax.glue_qnli", "glue/qnli:2.0.0", ("question", "sentence"), _GLUE_SPLITS),
    GlueTask("lexjax.glue_rte", "glue/rte:2.0.0", ("sentence1", "sentence2"), _GLUE_SPLITS),
)


def glue_text(fields: Sequence[str]) -> Callable[[tf.data.Dataset], tf.data.Dataset]:
    """A preprocessor: GLUE examples -> {"text", "label"}; one field is its text as it is, a
    pair reads "field1: <text> field2: <text>" (the T5 convention)."""
    def preprocess(dataset: tf.data.Dataset) -> tf.data.Dataset:
        def format_example(example):
            if len(fields) == 1:
                text = example[fields[0]]
            else:
                text = tf.strings.join([tf.strings.join([f"{name}:", example[name]], " ")
                                        for name in fields], " ")
            return {"text": text, "label": tf.cast(example["label"], tf.int32)}
        return dataset.map(format_example, num_parallel_calls=tf.data.AUTOTUNE)
    return preprocess


# ----------------------------------------------------------------------------- registry


@dataclasses.dataclass(frozen=True)
class _TaskSpec:
    """How to build a task for any `DataConfig` (vocabulary, glob)."""
    name: str
    make_source: Callable[[DataConfig], seqio.DataSource]
    preprocessors: Sequence[Callable[..., tf.data.Dataset]]

    def build(self, data: DataConfig, name: str | None = None) -> seqio.Task:
        return seqio.Task(
            name or self.name, source=self.make_source(data),
            output_features=output_features(data.seqio_vocabulary(), has_labels(self.name)),
            preprocessors=list(self.preprocessors))


#: Task name -> its corpus (given the run's DataConfig), for the tasks whose corpus is local files
#: (small enough to materialise in memory); every other task is streamed.
LOCAL_CORPORA: dict[str, Callable[[DataConfig], corpora.Corpus]] = {
    STDLIB_CODE: lambda data: corpora.stdlib_corpus(data.include_test_suites),
    TEXT_FILES: lambda data: corpora.text_files_corpus(data.text_files_glob),
    STDLIB_IS_TEST: lambda data: corpora.stdlib_corpus(include_test_suites=True),
}
#: The labels of a local classification task's files, from their relative paths.
LOCAL_LABELS: dict[str, Callable[[str], int]] = {
    STDLIB_IS_TEST: lambda relpath: int(corpora.is_test_suite(relpath)),
}


def _local_source(name: str, data: DataConfig) -> seqio.DataSource:
    corpus_fn = functools.partial(LOCAL_CORPORA[name], data)
    return seqio.FunctionDataSource(local_dataset_fn(corpus_fn, LOCAL_LABELS.get(name)),
                                    splits=corpora.SPLITS)


def _tfds_source(corpus: TfdsCorpus, data: DataConfig) -> seqio.DataSource:
    del data  # the same TFDS dataset for every vocabulary
    # read_only: a missing dataset raises instead of starting a download.
    return seqio.TfdsDataSource(tfds_name=corpus.tfds_name, splits=dict(corpus.splits),
                                read_only=True)


def _specs() -> list[_TaskSpec]:
    specs = [_TaskSpec(name, functools.partial(_local_source, name),
                       CLASSIFICATION_PREPROCESSORS if name in LOCAL_LABELS else LM_PREPROCESSORS)
             for name in LOCAL_CORPORA]
    for c in TFDS_CORPORA:
        rename = functools.partial(seqio.preprocessors.rekey, key_map={"text": c.text_key})
        specs.append(_TaskSpec(c.task_name, functools.partial(_tfds_source, c),
                               (rename, *LM_PREPROCESSORS)))
    for g in GLUE_TASKS:
        corpus = TfdsCorpus(g.task_name, g.tfds_name, "text", g.splits)
        specs.append(_TaskSpec(g.task_name, functools.partial(_tfds_source, corpus),
                               (glue_text(g.fields), *CLASSIFICATION_PREPROCESSORS)))
    return specs


_SPECS: dict[str, _TaskSpec] = {spec.name: spec for spec in _specs()}
_DERIVED: dict[str, seqio.Task] = {}


def register_tasks() -> None:
    """Registers every lexjax task with the byte vocabulary; a no-op for those already there."""
    registered = set(seqio.TaskRegistry.names())
    for spec in _SPECS.values():
        if spec.name not in registered:
            seqio.TaskRegistry.add_provider(spec.name, spec.build(DataConfig(task=spec.name)))


def task_names() -> list[str]:
    """Sorted names of the registered `lexjax.*` tasks."""
    return sorted(n for n in seqio.TaskRegistry.names() if n.startswith(TASK_PREFIX))


def derived_name(data: DataConfig) -> str:
    """"<task>.<vocabulary id>[.<glob hash>]": the name of a task built for `data`."""
    name = f"{data.task}.{vocabulary_id(data.seqio_vocabulary())}"
    if data.text_files_glob and data.task in LOCAL_CORPORA:
        name += "." + hashlib.sha1(data.text_files_glob.encode()).hexdigest()[:12]
    if not data.include_test_suites and data.task == STDLIB_CODE:
        name += ".no_test_suites"
    return name


def get_task(data: Union[DataConfig, str]) -> seqio.Task:
    """The task a `DataConfig` (or a bare task name: bytes) describes.

    Raises:
      DataError: listing the registered lexjax tasks, if `data.task` is not one of them.
    """
    data = as_data_config(data)
    if data.task not in seqio.TaskRegistry.names():
        raise DataError(f"unknown task {data.task!r}; registered lexjax tasks: "
                        f"{', '.join(task_names())}")
    if data.is_default:
        return seqio.get_mixture_or_task(data.task)
    if data.task not in _SPECS:
        raise DataError(f"task {data.task!r} was not registered by lexjax.data, so it has no "
                        "variant for another vocabulary or glob; use its registered form")
    name = derived_name(data)
    if name not in _DERIVED:
        _DERIVED[name] = _SPECS[data.task].build(data, name=name)
    return _DERIVED[name]


def check_split(task: seqio.Task, split: str) -> None:
    """Raises a DataError naming the available splits if `task` has no split `split`."""
    splits = list(task.source.splits)
    if split not in splits:
        raise DataError(f"task {task.name!r} has no split {split!r}; its splits: {splits}")


def has_labels(task_name: str) -> bool:
    """Whether the task's documents carry a class label (a classification task)."""
    return task_name in LOCAL_LABELS or any(g.task_name == task_name for g in GLUE_TASKS)


def tfds_name(task_name: str) -> str:
    """"name[/config]:version" of a TFDS-backed task."""
    for corpus in (*TFDS_CORPORA, *GLUE_TASKS):
        if corpus.task_name == task_name:
            return corpus.tfds_name
    raise DataError(f"task {task_name!r} is not read from TFDS")


def is_local(task_name: str) -> bool:
    """Whether the task's corpus is local files, materialised in memory rather than streamed."""
    return task_name in LOCAL_CORPORA


def local_corpus(data: Union[DataConfig, str]) -> corpora.Corpus:
    """The corpus of a local task, as `data` configures it."""
    data = as_data_config(data)
    return LOCAL_CORPORA[data.task](data)
