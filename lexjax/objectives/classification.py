"""Classification: fine-tune an encoder (or any model with a classification head) on a labelled
text task (`lexjax.data.classification`), or train an image classifier (a ViT) on an image task
(`lexjax.data.images`). The two objectives share the loss, the statistics and validation; they
differ in the batches they read."""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lexjax.errors import ConfigError
from lexjax.objectives.base import Objective


def confusion_metrics(confusion: np.ndarray) -> dict[str, float]:
    """accuracy, f1 (of class 1, for two classes) and mcc (Matthews, any number of classes) of
    a confusion matrix `[classes, classes]` (rows: true class, columns: predicted)."""
    c = np.asarray(confusion, np.float64)
    total = c.sum()
    correct = np.trace(c)
    out = {"accuracy": correct / max(total, 1.0)}
    if c.shape[0] == 2:
        tp, fp, fn = c[1, 1], c[0, 1], c[1, 0]
        out["f1"] = 2 * tp / max(2 * tp + fp + fn, 1.0)
    true, predicted = c.sum(axis=1), c.sum(axis=0)
    denominator = math.sqrt(max(total ** 2 - predicted @ predicted, 0.0)
                            * max(total ** 2 - true @ true, 0.0))
    out["mcc"] = (correct * total - true @ predicted) / denominator if denominator else 0.0
    return {k: float(v) for k, v in out.items()}


@gin.register(module="lexjax.objectives")
@dataclasses.dataclass(frozen=True)
class Classification(Objective):
    """Cross entropy of the model's class logits `[batch, classes]` against each row's label.

    The model must output one row of logits per example (an encoder with `num_classes` set,
    NUM_CLASSES in configs/runs/classify_quickstart.gin), as many as the task has classes.
    """

    name = "classification"

    def prepare(self, model, data):
        from lexjax.data import is_image_task
        if is_image_task(data.task):
            raise ConfigError(f"{data.task} holds images: train a ViT on it with "
                              "lexjax.objectives.ImageClassification "
                              "(configs/runs/vision_quickstart.gin)")
        return self.check_classes(model, data)

    def check_classes(self, model, data) -> "Classification":
        """This objective, once the model's class count is the task's (else a ConfigError)."""
        from lexjax.data import task_info
        info = task_info(data.task)
        if not hasattr(model, "num_classes"):
            raise ConfigError(f"{type(model).__name__} has no classification head; fine-tune an "
                              "encoder (configs/models/encoder.gin, configs/runs/"
                              "classify_quickstart.gin)")
        classes = model.num_classes
        if classes != info.num_classes:
            raise ConfigError(
                f"{data.task} has {info.num_classes} classes {info.labels}; the model's "
                f"classification head has {classes}: set NUM_CLASSES = {info.num_classes} "
                f"({type(model).__name__}.num_classes)")
        return self

    def batch_spec(self, model, batch_size, length):
        rows = jax.ShapeDtypeStruct((batch_size, length), jnp.int32)
        return {"inputs": rows, "segment_ids": rows,
                "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32)}

    @staticmethod
    def logits(model, variables, batch, **kwargs) -> jnp.ndarray:
        """float32 class logits `[batch, classes]`. The segment ids (1 for the example, 0 for
        padding) go to models that honour them; a model that mixes the whole row (Luna,
        kernelized RPE) reads the padded row as it is, padding included, as such models read
        padded training rows."""
        from lexjax.training.inputs import reads_segment_ids
        segments = batch["segment_ids"] if reads_segment_ids(model) else None
        return model.apply(variables, batch["inputs"], segment_ids=segments,
                           **kwargs).astype(jnp.float32)

    def loss(self, model, params, batch, *, rng, carry=None):
        logits = self.logits(model, {"params": params}, batch, deterministic=False,
                             rngs={"dropout": rng})
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        accuracy = jnp.mean((jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32))
        return jnp.mean(losses), {"accuracy": accuracy}, None

    def statistics(self, model):
        """`(variables, batch, valid, key) -> {"loss", "count", "confusion" [C, C]}` sums."""
        def statistics(variables, batch, valid, key):
            del key
            logits = self.logits(model, variables, batch, deterministic=True)
            losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
            keep = valid.astype(jnp.float32)
            classes = logits.shape[-1]
            pairs = (jax.nn.one_hot(batch["label"], classes)[:, :, None]
                     * jax.nn.one_hot(jnp.argmax(logits, -1), classes)[:, None, :])
            return {"loss": jnp.sum(losses * keep), "count": jnp.sum(keep),
                    "confusion": jnp.sum(pairs * keep[:, None, None], axis=0)}
        return statistics

    def training_batches(self, model, config, start_step=0):
        from lexjax import data
        from lexjax.training.inputs import host_shard
        shard_index, num_shards = host_shard(config)
        return data.classification_batches(
            config.data, length=config.train_length, batch_size=config.batch_size,
            seed=config.seed, start_step=start_step, shard_index=shard_index,
            num_shards=num_shards)

    def examples(self, data, *, length: int, split: str,
                 max_examples: Optional[int] = None) -> dict[str, np.ndarray]:
        """Every example of a split (the first `max_examples`, spread evenly over it), as the
        batches hold them: rows of `length` tokens with their segment ids and labels."""
        from lexjax.data import classification_examples
        return classification_examples(data, length=length, split=split,
                                       max_examples=max_examples)

    def validator(self, model, config, mesh, rules):
        from lexjax.evaluation.batches import BatchEvaluator
        rows = self.examples(config.data, length=config.train_length, split="validation",
                             max_examples=config.eval_windows)
        evaluator = BatchEvaluator(self.statistics(model), batch_size=config.batch_size,
                                   mesh=mesh, rules=rules)

        def validate(params):
            sums = evaluator({"params": params}, rows)
            scores = confusion_metrics(sums["confusion"])
            return {"validation_loss": float(sums["loss"]) / max(float(sums["count"]), 1.0),
                    "validation_accuracy": scores["accuracy"]}
        return validate


@gin.register(module="lexjax.objectives")
@dataclasses.dataclass(frozen=True)
class ImageClassification(Classification):
    """`Classification` of images: batches `{"image": float32 [batch, H, W, C], "label"}` of an
    image task (`lexjax.data.images`: MIXTURE_OR_TASK_NAME "lexjax.digits", "lexjax.cifar10")
    read by a model with an `input_spec` (a `lexjax.models.ViT`). TRAIN_LENGTH must be the
    model's patches per image: throughput and MFU count patches as tokens."""

    def prepare(self, model, data):
        from lexjax.data import IMAGE_TASKS, image_task, is_image_task
        if not is_image_task(data.task):
            raise ConfigError(f"{data.task} is not an image task: ImageClassification reads "
                              f"one of {sorted(IMAGE_TASKS)} (MIXTURE_OR_TASK_NAME)")
        if not callable(getattr(model, "input_spec", None)):
            raise ConfigError(f"{type(model).__name__} does not read images: train "
                              "lexjax.models.ViT (configs/models/vit.gin)")
        expected = image_task(data.task).image_shape
        got = tuple(model.input_spec(1).shape[1:])
        if got != expected:
            raise ConfigError(f"{data.task} images are {list(expected)} (height, width, "
                              f"channels), the model reads {list(got)}: set "
                              f"{type(model).__name__}.image_size and .channels to match")
        return self.check_classes(model, data)

    def batch_spec(self, model, batch_size, length):
        patches = getattr(model, "num_patches", length)
        if length != patches:
            raise ConfigError(f"TRAIN_LENGTH = {length}, but {type(model).__name__} cuts each "
                              f"image into {patches} patches: set TRAIN_LENGTH = {patches}")
        return {"image": model.input_spec(batch_size),
                "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32)}

    @staticmethod
    def logits(model, variables, batch, **kwargs) -> jnp.ndarray:
        """float32 class logits `[batch, classes]` of `batch["image"]`."""
        return model.apply(variables, batch["image"], **kwargs).astype(jnp.float32)

    def training_batches(self, model, config, start_step=0):
        from lexjax import data
        from lexjax.training.inputs import host_shard
        shard_index, num_shards = host_shard(config)
        return data.image_batches(config.data.task, batch_size=config.batch_size,
                                  seed=config.seed, start_step=start_step,
                                  shard_index=shard_index, num_shards=num_shards)

    def examples(self, data, *, length, split, max_examples=None):
        """Every image of a split (`length` unused: an image is always whole)."""
        from lexjax.data import image_examples
        return image_examples(data.task, split, max_examples)
