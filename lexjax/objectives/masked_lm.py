"""Masked-language-model pre-training (BERT / RoBERTa style, masks drawn anew every step)."""
from __future__ import annotations

import dataclasses
import numbers
from typing import Optional

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lexjax.errors import ConfigError
from lexjax.objectives.base import TokenObjective, is_bidirectional
from lexjax.objectives.masking import UNITS, mask_tokens, unit_starts, visible_length

#: The first id of a text token in lexjax's vocabularies (0 pad, 1 EOS, 2 UNK come first).
FIRST_TEXT_ID = 3


@gin.register(module="lexjax.objectives")
@dataclasses.dataclass(frozen=True)
class MaskedLM(TokenObjective):
    """Predict the masked tokens of packed rows (`lexjax.objectives.masking`).

    Attributes:
      mask_rate: the probability a unit is masked (MASK_RATE; 0.15 in BERT, up to 0.5 for 3ML).
      unit: "token", "word" (whole words: runs of letters, digits and `_` for bytes, pieces
        without a leading "▁" continue a SentencePiece word) or "span" (`span_length` tokens).
      span_length: tokens per span for `unit="span"`.
      keep_fraction, random_fraction: of the masked tokens, the fractions left as they are and
        replaced by a random text token (BERT: 0.1 and 0.1; the rest become the mask token).
      mask_id, text_ids, word_roles: resolved by `prepare` from the vocabulary (the mask
        token is the first id past the vocabulary, so VOCAB_SIZE must leave room for it);
        documents_apart: evaluation windows stay inside documents (models trained on one
        document per row, `packs_documents` False); hides_masks: the model hides the masked
        tokens from its encoder (`hides_masked_tokens`: late [MASK] insertion), so exactly
        `floor(rate x tokens)` are picked per row, all become [MASK] (no 80/10/10: the encoder
        never reads those positions), and the model is told which (`hidden=`).
    """

    mask_rate: float = 0.15
    unit: str = "token"
    span_length: int = 3
    keep_fraction: float = 0.1
    random_fraction: float = 0.1
    mask_id: Optional[int] = dataclasses.field(default=None, init=False)
    text_ids: Optional[tuple[int, int]] = dataclasses.field(default=None, init=False)
    word_roles: Optional[tuple[int, ...]] = dataclasses.field(default=None, init=False)
    documents_apart: bool = dataclasses.field(default=False, init=False)
    hides_masks: bool = dataclasses.field(default=False, init=False)

    name = "masked_lm"

    def __post_init__(self):
        rate = self.mask_rate
        if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0 < rate < 1:
            raise ConfigError(f"MASK_RATE (MaskedLM.mask_rate) must lie in (0, 1), got {rate!r}")
        if self.unit not in UNITS:
            raise ConfigError(f"lexjax.objectives.MaskedLM.unit must be one of {UNITS}, got "
                              f"{self.unit!r}")
        if not isinstance(self.span_length, int) or self.span_length < 1:
            raise ConfigError(f"lexjax.objectives.MaskedLM.span_length must be a positive int, "
                              f"got {self.span_length!r}")
        if not (0 <= self.keep_fraction and 0 <= self.random_fraction
                and self.keep_fraction + self.random_fraction <= 1):
            raise ConfigError("MaskedLM.keep_fraction and random_fraction must be >= 0 with a "
                              f"sum <= 1, got {self.keep_fraction} and {self.random_fraction}")

    def prepare(self, model, data):
        from lexjax.data import word_roles
        from lexjax.training.state import carries_state
        if not is_bidirectional(model):
            raise ConfigError(
                f"{type(model).__name__} is causal: masked-LM pre-training needs a bidirectional "
                "encoder (configs/models/encoder.gin); causal models train with the default "
                "next-token objective")
        if carries_state(model):
            raise ConfigError(f"{type(model).__name__} carries state across segments; masked-LM "
                              "pre-training reads independent rows")
        if getattr(model, "num_classes", None) is not None:
            raise ConfigError(f"{type(model).__name__} has a classification head (NUM_CLASSES = "
                              f"{model.num_classes}); masked-LM pre-training needs "
                              "NUM_CLASSES = None, classification configs/runs/"
                              "classify_quickstart.gin")
        hides_masks = bool(getattr(model, "hides_masked_tokens", False))
        if hides_masks and model.mask_rate != self.mask_rate:
            raise ConfigError(
                f"{type(model).__name__}.mask_rate {model.mask_rate} sizes its encoder for another "
                f"rate than MaskedLM.mask_rate {self.mask_rate}: bind both to MASK_RATE "
                "(configs/models/late_mask.gin does)")
        vocabulary = data.seqio_vocabulary()
        size = int(vocabulary.vocab_size)
        if model.vocab_size <= size:
            raise ConfigError(
                f"VOCAB_SIZE {model.vocab_size} leaves no id for the mask token: the vocabulary "
                f"has {size} ids and the mask token is id {size}; set VOCAB_SIZE > {size}")
        table = np.zeros(model.vocab_size, np.int8)
        table[:size] = word_roles(vocabulary)
        prepared = dataclasses.replace(self)
        for name, value in (("mask_id", size), ("text_ids", (FIRST_TEXT_ID, size)),
                            ("word_roles", tuple(int(x) for x in table)),
                            ("documents_apart", not model.packs_documents),
                            ("hides_masks", hides_masks)):
            object.__setattr__(prepared, name, value)
        return prepared

    def corrupt(self, key: jax.Array, targets: jnp.ndarray, segment_ids: jnp.ndarray
                ) -> tuple[jnp.ndarray, jnp.ndarray]:
        """(model inputs, picked) for `targets [batch, length]` (see `masking.mask_tokens`)."""
        if self.mask_id is None:
            raise ValueError("MaskedLM.prepare(model, data) resolves the mask token first")
        phase_key, mask_key = jax.random.split(key)
        phase = jax.random.randint(phase_key, targets.shape[:1], 0, self.span_length)
        starts = unit_starts(targets, segment_ids, self.unit,
                             word_roles=jnp.asarray(self.word_roles, jnp.int8),
                             span_length=self.span_length, phase=phase)
        # a model that hides the masked tokens reads a fixed number of visible ones, all others
        # [MASK]: exact counts, no 80/10/10
        keep, random, visible = ((0.0, 0.0, visible_length(targets.shape[1], self.mask_rate))
                                 if self.hides_masks
                                 else (self.keep_fraction, self.random_fraction, None))
        return mask_tokens(mask_key, targets, segment_ids, starts, rate=self.mask_rate,
                           mask_id=self.mask_id, random_ids=self.text_ids, keep_fraction=keep,
                           random_fraction=random, visible=visible)

    def masked_statistics(self, model, variables, batch, key, *, deterministic=True,
                          rngs=None) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
        """Per-row (loss sum, correct predictions, masked tokens) `[batch]` float32 of one
        masked forward pass."""
        from lexjax.training.inputs import reads_segment_ids
        targets, segments = batch["targets"], batch["segment_ids"]
        inputs, picked = self.corrupt(key, targets, segments)
        hidden = {"hidden": picked} if self.hides_masks else {}
        logits = model.apply(variables, inputs, deterministic=deterministic, rngs=rngs,
                             segment_ids=segments if reads_segment_ids(model) else None,
                             **hidden)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                                 targets)
        weights = picked.astype(jnp.float32)
        correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
        return (jnp.sum(losses * weights, axis=1), jnp.sum(correct * weights, axis=1),
                jnp.sum(weights, axis=1))

    def loss(self, model, params, batch, *, rng, carry=None):
        mask_key, dropout_key = jax.random.split(rng)
        losses, correct, count = self.masked_statistics(
            model, {"params": params}, batch, mask_key, deterministic=False,
            rngs={"dropout": dropout_key})
        total = jnp.maximum(jnp.sum(count), 1.0)
        tokens = jnp.maximum(jnp.sum((batch["segment_ids"] > 0).astype(jnp.float32)), 1.0)
        metrics = {"masked_accuracy": jnp.sum(correct) / total,
                   "masked_fraction": jnp.sum(count) / tokens}
        return jnp.sum(losses) / total, metrics, None

    def statistics(self, model):
        """`(variables, batch, valid, key) -> sums` for `lexjax.evaluation.BatchEvaluator`."""
        def statistics(variables, batch, valid, key):
            losses, correct, count = self.masked_statistics(model, variables, batch, key)
            keep = valid.astype(jnp.float32)
            return {"loss": jnp.sum(losses * keep), "correct": jnp.sum(correct * keep),
                    "count": jnp.sum(count * keep)}
        return statistics

    def windows(self, data, *, length: int, split: str, max_windows: int) -> dict:
        """Evaluation rows: consecutive windows of the split's stream with their segment ids
        (windows inside documents, `documents_apart`, as the model trained)."""
        from lexjax import data as data_lib
        windows = data_lib.eval_windows(data, length=length, split=split,
                                        max_windows=max_windows,
                                        respect_documents=self.documents_apart)
        return {"targets": windows,
                "segment_ids": data_lib.segment_ids(windows, data.seqio_vocabulary().eos_id)}

    def validator(self, model, config, mesh, rules):
        from lexjax.evaluation.batches import BatchEvaluator
        rows = self.windows(config.data, length=config.train_length, split="validation",
                            max_windows=config.eval_windows)
        evaluator = BatchEvaluator(self.statistics(model), batch_size=config.batch_size,
                                   mesh=mesh, rules=rules)

        def validate(params):
            sums = evaluator({"params": params}, rows, seed=config.seed)
            count = max(float(sums["count"]), 1.0)
            return {"validation_loss": float(sums["loss"]) / count,
                    "validation_masked_accuracy": float(sums["correct"]) / count}
        return validate
