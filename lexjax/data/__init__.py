"""seqio-based data for language-model training and "train short, test long" evaluation.

Importing this package imports TensorFlow (quietly, with accelerators hidden from it) and registers
the seqio tasks `lexjax.stdlib_code`, `lexjax.text_files`, `lexjax.pg19`, `lexjax.wiki40b_en`,
`lexjax.c4_en`, `lexjax.arxiv` and `lexjax.lm1b` (see `tasks.py`).

The API the trainer and evaluator use returns numpy only:

    batches = train_batches("lexjax.stdlib_code", length=512, batch_size=32, seed=0)
    tokens = next(batches)                                   # int32 [32, 512]
    windows = eval_windows("lexjax.stdlib_code", length=2048) # int32 [num_windows, 2048]
    segments = stream_batches("lexjax.stdlib_code", length=512, batch_size=32)
    # ... row i of each batch continues row i of the previous one (state-carrying models)
    bpb = loss_per_token / math.log(2) / bytes_per_token("lexjax.stdlib_code", "test")

Modules: `corpora` (local corpora and their hash splits), `vocab` (byte / SentencePiece, gin),
`tasks` (seqio registrations), `streams` (tf.data -> numpy, on-disk token cache), `packing`
(pure numpy packing, batching and windows), `pipeline` (the API above), `train_sentencepiece`
(CLI).
"""
from lexjax.data import _tf_setup  # noqa: F401  (first: quiets TensorFlow before it loads)
from lexjax.data.corpora import (SPLITS, Corpus, split_of, stdlib_corpus, text_files_corpus,
                                 text_files_glob)
from lexjax.data.errors import DataError
from lexjax.data.pipeline import (bytes_per_token, eval_windows, stream_batches, stream_segments,
                                  train_batches)
from lexjax.data.streams import CACHE_ENV, cache_root
from lexjax.data.tasks import STDLIB_CODE, TEXT_FILES, get_task, register_tasks, task_names
from lexjax.data.vocab import BYTE_VOCAB_SIZE, get_vocabulary, vocab_size

register_tasks()

__all__ = [
    "BYTE_VOCAB_SIZE", "CACHE_ENV", "Corpus", "DataError", "SPLITS", "STDLIB_CODE", "TEXT_FILES",
    "bytes_per_token", "cache_root", "eval_windows", "get_task", "get_vocabulary",
    "register_tasks", "split_of", "stdlib_corpus", "stream_batches", "stream_segments",
    "task_names", "text_files_corpus",
    "text_files_glob", "train_batches", "vocab_size",
]
