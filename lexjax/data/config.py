"""What a run reads: a task, its vocabulary and, for the `lexjax.text_files` task, the glob of its
files. One frozen, gin-configurable object (a run gin binds it into the run's
`lexjax.training.TrainConfig`); every data function takes it (or a bare task name, meaning the
byte vocabulary), so nothing in `lexjax.data` reads gin.

    DataConfig(task="lexjax.stdlib_code")
    DataConfig(task="lexjax.text_files", text_files_glob="/data/books/**/*.txt",
               vocabulary="sentencepiece", sentencepiece_model="/models/books_8k.model")
    DataConfig(task="lexjax.stdlib_code", vocabulary="tokenizer_json",
               tokenizer_file="/checkpoints/gpt2/tokenizer.json")
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Union

import gin
import seqio

from lexjax.data.errors import DataError
from lexjax.data.vocab import VOCABULARY_KINDS, get_vocabulary


@gin.register(module="lexjax.data")
@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The data of a run.

    Attributes:
      task: a registered task (MIXTURE_OR_TASK_NAME), e.g. "lexjax.stdlib_code".
      vocabulary: "byte" (default), "sentencepiece" (configs/data/sentencepiece.gin) or
        "tokenizer_json" (a Hugging Face checkpoint's tokenizer; see `lexjax.data.vocab`).
      sentencepiece_model: the SentencePiece model file, for "sentencepiece".
      tokenizer_file: the tokenizer.json file, for "tokenizer_json".
      text_files_glob: the files of the `lexjax.text_files` task (configs/data/text_files.gin).
      include_test_suites: the `lexjax.stdlib_code` task keeps the standard library's own test
        suites (more than half of its text; see `lexjax.data.corpora`).
    """

    task: str
    vocabulary: str = "byte"
    sentencepiece_model: Optional[str] = None
    tokenizer_file: Optional[str] = None
    text_files_glob: Optional[str] = None
    include_test_suites: bool = True

    def __post_init__(self):
        if not isinstance(self.task, str) or not self.task:
            raise DataError(f"the task must be a task name such as 'lexjax.stdlib_code', got "
                            f"{self.task!r} (MIXTURE_OR_TASK_NAME)")
        if self.vocabulary not in VOCABULARY_KINDS:
            raise DataError(f"unknown vocabulary {self.vocabulary!r} "
                            f"(lexjax.data.DataConfig.vocabulary); use one of {VOCABULARY_KINDS}")
        if self.vocabulary == "sentencepiece" and not self.sentencepiece_model:
            raise DataError("vocabulary 'sentencepiece' needs a model file: set "
                            "SENTENCEPIECE_MODEL with configs/data/sentencepiece.gin")
        if self.vocabulary == "tokenizer_json" and not self.tokenizer_file:
            raise DataError("vocabulary 'tokenizer_json' needs a tokenizer file: set "
                            "lexjax.data.DataConfig.tokenizer_file to a tokenizer.json")

    def seqio_vocabulary(self) -> seqio.Vocabulary:
        """The tokenizer (built once per process and model or tokenizer file)."""
        return get_vocabulary(self.vocabulary, self.sentencepiece_model, self.tokenizer_file)

    @property
    def is_default(self) -> bool:
        """The task as registered: bytes, no glob, the whole standard library."""
        return (self.vocabulary == "byte" and self.text_files_glob is None
                and self.include_test_suites)


def as_data_config(data: Union[DataConfig, str]) -> DataConfig:
    """`data` itself, or `DataConfig(task=data)` for a bare task name."""
    return data if isinstance(data, DataConfig) else DataConfig(task=data)
