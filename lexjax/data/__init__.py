"""seqio-based data for language-model training and "train short, test long" evaluation.

Importing this package imports TensorFlow (quietly, with accelerators hidden from it) and registers
the seqio tasks `lexjax.stdlib_code`, `lexjax.text_files`, `lexjax.pg19`, `lexjax.wiki40b_en`,
`lexjax.c4_en`, `lexjax.arxiv` and `lexjax.lm1b`, and the classification tasks
`lexjax.stdlib_is_test` and `lexjax.glue_*` (see `tasks.py`, `classification.py`), and the image
classification tasks `lexjax.digits` and `lexjax.cifar10` (`images.py`).

A run's data is one `DataConfig` (task, vocabulary, text-files glob); the API the trainer and
evaluator use takes it (or a bare task name, bytes) and returns numpy only:

    data = DataConfig(task="lexjax.stdlib_code")
    batches = train_batches(data, length=512, batch_size=32, seed=0)
    tokens = next(batches)                                   # int32 [32, 512], packed documents
    ids = segment_ids(tokens)                                # int32 [32, 512]: 1, 2, ...
    padded = train_batches(data, length=512, batch_size=32, pack=False)  # one piece per row
    windows = eval_windows(data, length=2048)                # int32 [num_windows, 2048]
    segments = stream_batches(data, length=512, batch_size=32)
    # ... row i of each batch continues row i of the previous one (state-carrying models)
    bpb = loss_per_token / math.log(2) / bytes_per_token(data, "test")
    rows = classification_examples("lexjax.stdlib_is_test", length=512)  # inputs, labels
    pictures = image_examples("lexjax.digits", "test")       # float32 [E, 8, 8, 1], labels

Modules: `config` (DataConfig), `corpora` (local corpora and their hash splits), `vocab` (byte /
SentencePiece), `tasks` (seqio registrations), `streams` (tf.data -> numpy, on-disk token cache),
`packing` (pure numpy packing, segment ids, padding, batching and windows), `pipeline` (the API
above), `images` (image tasks: images and labels as numpy), `train_sentencepiece` (CLI). Nothing
here reads gin; `DataConfig` is gin-configurable.
"""
from lexjax.data import _tf_setup  # noqa: F401  (first: quiets TensorFlow before it loads)
from lexjax.data.classification import (CLASSIFICATION_TASKS, ClassificationTask, class_counts,
                                        classification_batches, classification_examples,
                                        task_info)
from lexjax.data.config import DataConfig
from lexjax.data.corpora import SPLITS, Corpus, split_of, stdlib_corpus, text_files_corpus
from lexjax.data.errors import DataError
from lexjax.data.images import (IMAGE_TASKS, ImageTask, image_batches, image_examples, image_task,
                                is_image_task, register_image_tasks)
from lexjax.data.packing import EOS_ID, PAD_ID, segment_ids
from lexjax.data.pipeline import (bytes_per_token, eval_windows, stream_batches, stream_segments,
                                  train_batches)
from lexjax.data.streams import CACHE_ENV, cache_root
from lexjax.data.tasks import STDLIB_CODE, TEXT_FILES, get_task, register_tasks, task_names
from lexjax.data.vocab import BYTE_VOCAB_SIZE, get_vocabulary, vocab_size, word_roles

register_tasks()
register_image_tasks()

__all__ = [
    "CLASSIFICATION_TASKS", "ClassificationTask", "class_counts", "classification_batches",
    "classification_examples", "task_info", "BYTE_VOCAB_SIZE", "CACHE_ENV", "Corpus", "DataConfig",
    "DataError", "EOS_ID", "IMAGE_TASKS", "ImageTask", "image_batches", "image_examples",
    "image_task", "is_image_task", "register_image_tasks", "PAD_ID", "SPLITS", "STDLIB_CODE",
    "TEXT_FILES", "bytes_per_token",
    "cache_root", "eval_windows", "get_task", "get_vocabulary", "register_tasks", "segment_ids",
    "split_of", "stdlib_corpus", "stream_batches", "stream_segments", "task_names",
    "text_files_corpus", "train_batches", "vocab_size", "word_roles",
]
