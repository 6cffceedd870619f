"""Image classification data: seqio tasks of labelled images, read into numpy.

Every image task yields `{"image": float32 [height, width, channels] in [0, 1], "label": int32}`
(its raw pixels divided by the source's maximum value, by one shared preprocessor):

    task            source                                      image        train / valid. / test
    lexjax.digits   scikit-learn's 8x8 handwritten digits       [8, 8, 1]    1259 / 179 / 359
                    (embedded in the package: no download)
    lexjax.cifar10  tfds cifar10:3.0.2 (prepared beforehand)    [32, 32, 3]  45000 / 5000 / 10000

The digits split is fixed and stratified (`digits_split`): each class's images in the order of
one seeded permutation, the first 10% validation, the next 20% test, the rest train. CIFAR-10's
validation split is the last 5,000 training images ("train[45000:]"); TFDS datasets are never
downloaded at run time (`tfds build cifar10` elsewhere, then point TFDS_DATA_DIR at it).

    images = image_examples("lexjax.digits", "test")    # {"image": [E, 8, 8, 1], "label": [E]}
    batches = image_batches("lexjax.digits", batch_size=32, seed=0)   # a pure fn of (seed, step)
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Callable, Iterator, Optional

import numpy as np
import seqio
import tensorflow as tf

from lexjax.data import corpora, packing, tasks
from lexjax.data.errors import DataError

DIGITS = "lexjax.digits"
CIFAR10 = "lexjax.cifar10"
#: The digits split: the shares of each class's images held out, and the permutation's seed.
DIGITS_HELD_OUT = {"validation": 0.1, "test": 0.2}
DIGITS_SPLIT_SEED = 0

Images = dict  # {"image": float32 [E, height, width, channels], "label": int32 [E]}


@dataclasses.dataclass(frozen=True)
class ImageTask:
    """A labelled image dataset as a seqio task.

    Attributes:
      name: the seqio task's name.
      labels: the class names, by label id.
      image_shape: (height, width, channels) of every image.
      max_value: the sources' largest pixel value (images are divided by it).
      make_source: the seqio data source of raw `{"image", "label"}` examples.
    """
    name: str
    labels: tuple[str, ...]
    image_shape: tuple[int, int, int]
    max_value: float
    make_source: Callable[[], seqio.DataSource]


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: uint8 images `[1797, 8, 8, 1]` (0..16), int32 labels `[1797]`."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    return digits.images.astype(np.uint8)[..., None], digits.target.astype(np.int32)


@functools.lru_cache(maxsize=1)
def digits_split() -> dict[str, np.ndarray]:
    """split -> sorted int64 indices into the 1,797 digits: stratified, the same everywhere."""
    labels = _digits()[1]
    rng = np.random.default_rng(DIGITS_SPLIT_SEED)
    parts: dict[str, list[np.ndarray]] = {split: [] for split in corpora.SPLITS}
    for label in range(int(labels.max()) + 1):
        order = rng.permutation(np.flatnonzero(labels == label))
        start = 0
        for split, share in DIGITS_HELD_OUT.items():
            count = round(share * len(order))
            parts[split].append(order[start:start + count])
            start += count
        parts["train"].append(order[start:])
    return {split: np.sort(np.concatenate(p)) for split, p in parts.items()}


def _digits_dataset(split: str, shuffle_files: bool, seed: Optional[int] = None
                    ) -> tf.data.Dataset:
    images, labels = _digits()
    index = digits_split()[split]
    ds = tf.data.Dataset.from_tensor_slices({"image": images[index], "label": labels[index]})
    return ds.shuffle(len(index), seed=seed) if shuffle_files else ds


def _digits_source() -> seqio.DataSource:
    return seqio.FunctionDataSource(_digits_dataset, splits=corpora.SPLITS)


def _cifar10_source() -> seqio.DataSource:
    # read_only: a missing dataset raises instead of starting a download.
    return seqio.TfdsDataSource(tfds_name="cifar10:3.0.2", read_only=True, splits={
        "train": "train[:45000]", "validation": "train[45000:]", "test": "test"})


IMAGE_TASKS: dict[str, ImageTask] = {t.name: t for t in (
    ImageTask(DIGITS, tuple(str(d) for d in range(10)), (8, 8, 1), 16.0, _digits_source),
    ImageTask(CIFAR10, ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                        "ship", "truck"), (32, 32, 3), 255.0, _cifar10_source),
)}


def is_image_task(task_name: str) -> bool:
    return task_name in IMAGE_TASKS


def image_task(task_name: str) -> ImageTask:
    """The `ImageTask` of a name; a DataError naming the image tasks for any other."""
    if task_name not in IMAGE_TASKS:
        raise DataError(f"{task_name!r} is not an image task; use one of {sorted(IMAGE_TASKS)} "
                        "(MIXTURE_OR_TASK_NAME)")
    return IMAGE_TASKS[task_name]


def scale_images(max_value: float) -> Callable[[tf.data.Dataset], tf.data.Dataset]:
    """A preprocessor: raw `{"image", "label"}` -> float32 images / `max_value`, int32 labels."""
    def preprocess(dataset: tf.data.Dataset) -> tf.data.Dataset:
        def scale(example):
            return {"image": tf.cast(example["image"], tf.float32) / max_value,
                    "label": tf.cast(example["label"], tf.int32)}
        return dataset.map(scale, num_parallel_calls=tf.data.AUTOTUNE)
    return preprocess


def image_features() -> dict[str, seqio.Feature]:
    """float32 `"image" [H, W, C]` and int32 scalar `"label"`: no vocabulary, no EOS."""
    def feature(dtype, rank):
        return seqio.Feature(seqio.PassThroughVocabulary(size=0), add_eos=False, dtype=dtype,
                             rank=rank)
    return {"image": feature(tf.float32, 3), "label": feature(tf.int32, 0)}


def register_image_tasks() -> None:
    """Registers every image task with seqio; a no-op for those already there."""
    registered = set(seqio.TaskRegistry.names())
    for task in IMAGE_TASKS.values():
        if task.name not in registered:
            seqio.TaskRegistry.add(task.name, source=task.make_source(),
                                   output_features=image_features(),
                                   preprocessors=[scale_images(task.max_value)])


@functools.lru_cache(maxsize=8)
def _split_arrays(task_name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Every image and label of a split, in source order (read once per process)."""
    task = seqio.get_mixture_or_task(image_task(task_name).name)
    tasks.check_split(task, split)
    try:
        ds = task.get_dataset(sequence_length=None, split=split, shuffle=False,
                              try_in_mem_cache=False)
    except AssertionError as e:  # How TFDS reports a dataset that is not prepared.
        raise DataError(f"task {task_name!r} cannot read its split {split!r}: "
                        f"{str(e).splitlines()[0]} TFDS datasets are never downloaded at run "
                        "time: run `tfds build` on a machine with network access and point "
                        "TFDS_DATA_DIR at it") from e
    images, labels = [], []
    for batch in ds.batch(1024).as_numpy_iterator():
        images.append(batch["image"])
        labels.append(batch["label"])
    if not images:
        raise DataError(f"split {split!r} of task {task_name!r} has no images")
    arrays = np.concatenate(images), np.concatenate(labels).astype(np.int32)
    for array in arrays:
        array.setflags(write=False)
    return arrays


def image_examples(task_name: str, split: str = "test",
                   max_examples: Optional[int] = None) -> Images:
    """Every example of a split in source order (the first `max_examples`, spread evenly over
    the split when there are more)."""
    images, labels = _split_arrays(task_name, split)
    if max_examples is not None and len(labels) > max_examples:
        keep = np.linspace(0, len(labels) - 1, max_examples).round().astype(np.int64)
        images, labels = images[keep], labels[keep]
    return {"image": images, "label": labels}


def image_batches(task_name: str, *, batch_size: int, seed: int = 0, split: str = "train",
                  start_step: int = 0, shard_index: int = 0, num_shards: int = 1
                  ) -> Iterator[Images]:
    """This host's rows of global batch k, k = start_step, start_step + 1, ...: examples in an
    order reshuffled every epoch from `seed` (`packing.example_ids`), as for text."""
    if batch_size % num_shards or not 0 <= shard_index < num_shards:
        raise DataError(f"need 0 <= shard_index < num_shards dividing batch_size; got "
                        f"{shard_index=}, {num_shards=}, {batch_size=}")
    images, labels = _split_arrays(task_name, split)
    per_host = batch_size // num_shards
    rows = slice(shard_index * per_host, (shard_index + 1) * per_host)
    for step in itertools.count(start_step):
        ids = packing.example_ids(step, batch_size, len(labels), seed=seed, rows=rows)
        yield {"image": images[ids], "label": labels[ids]}
