"""The vision track: image tasks (`lexjax.data.images`), 2-D RoPE (`lexjax.positions.RoPE2D`),
the ViT (`lexjax.models.ViT`) and its training and evaluation through the project's own trainer
(`ImageClassification`, `python -m lexjax.evaluate`), each against an independent reference."""
import json
import math
import os

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lexjax import data
from lexjax.config import parse_gin
from lexjax.data import images
from lexjax.errors import ConfigError
from lexjax.models import ViT
from lexjax.models.vit import patchify
from lexjax.objectives import Classification, ImageClassification
from lexjax.positions import RoPE, RoPE2D

TINY_VIT = dict(num_layers=2, embed_dim=32, num_heads=4, mlp_dim=64, num_classes=10)


# ---------------------------------------------------------------------------------- data

def test_the_digits_split_is_fixed_disjoint_stratified_and_covers_every_image():
    from sklearn.datasets import load_digits

    split = images.digits_split()
    again = images.digits_split.__wrapped__()  # recomputed, not the cached value
    for name in data.SPLITS:
        np.testing.assert_array_equal(split[name], again[name])
    assert {k: len(v) for k, v in split.items()} == {"train": 1259, "validation": 179,
                                                     "test": 359}
    everything = np.concatenate(list(split.values()))
    np.testing.assert_array_equal(np.sort(everything), np.arange(1797))  # disjoint, complete
    labels = load_digits().target
    for name, share in images.DIGITS_HELD_OUT.items():
        per_class = np.bincount(labels[split[name]], minlength=10)
        assert np.all(np.abs(per_class - share * np.bincount(labels)) <= 0.5), name


def test_the_digits_task_yields_the_split_scaled_to_the_unit_interval():
    from sklearn.datasets import load_digits

    digits = load_digits()
    index = images.digits_split()["validation"]
    got = data.image_examples(images.DIGITS, "validation")
    assert got["image"].shape == (179, 8, 8, 1) and got["image"].dtype == np.float32
    assert got["label"].dtype == np.int32
    np.testing.assert_allclose(got["image"][..., 0], digits.images[index] / 16.0, atol=1e-7)
    np.testing.assert_array_equal(got["label"], digits.target[index])


def test_image_batches_are_a_pure_function_of_seed_and_step_and_split_over_hosts():
    whole = list(zip(range(3), data.image_batches(images.DIGITS, batch_size=8, seed=1)))
    resumed = next(data.image_batches(images.DIGITS, batch_size=8, seed=1, start_step=2))
    np.testing.assert_array_equal(resumed["label"], whole[2][1]["label"])
    halves = [next(data.image_batches(images.DIGITS, batch_size=8, seed=1, shard_index=i,
                                      num_shards=2)) for i in range(2)]
    np.testing.assert_array_equal(np.concatenate([h["image"] for h in halves]),
                                  whole[0][1]["image"])


def test_cifar10_reads_tfds_mock_examples_with_the_right_layout():
    import tensorflow_datasets as tfds

    try:
        with tfds.testing.mock_data(num_examples=6):
            got = data.image_examples(images.CIFAR10, "test")
            batch = next(data.image_batches(images.CIFAR10, batch_size=4, split="validation"))
    finally:
        images._split_arrays.cache_clear()  # mock images must not outlive the mock
    assert got["image"].shape == (6, 32, 32, 3) and got["image"].dtype == np.float32
    assert 0.0 <= got["image"].min() and got["image"].max() <= 1.0
    assert got["label"].dtype == np.int32 and set(got["label"]) <= set(range(10))
    assert batch["image"].shape == (4, 32, 32, 3)
    assert data.task_info(images.CIFAR10).num_classes == 10


# ---------------------------------------------------------------------------------- patches

def test_patches_of_a_hand_made_image():
    image = np.arange(4 * 4 * 2, dtype=np.float32).reshape(1, 4, 4, 2)  # [b, H, W, C]
    expected = np.stack([image[0, r:r + 2, c:c + 2].reshape(-1)  # (row, column, channel)
                         for r in (0, 2) for c in (0, 2)])[None]
    np.testing.assert_array_equal(np.asarray(patchify(jnp.asarray(image), 2)), expected)
    # Patch 1 (top right) holds pixels (0, 2), (0, 3), (1, 2), (1, 3).
    assert list(expected[0, 1, ::2]) == [4.0, 6.0, 12.0, 14.0]


# ---------------------------------------------------------------------------------- 2-D RoPE

def score(scheme, q, k, q_position, k_position) -> float:
    """q . k of single vectors `[d]` after the scheme's rotation at flat positions."""
    qr, kr = scheme.rotate(jnp.asarray(q)[None, None, None], jnp.asarray(k)[None, None, None],
                           np.array([q_position]), np.array([k_position]))
    return float(jnp.sum(qr * kr))


def reference_score(q, k, q_cell, k_cell, base) -> float:
    """float64: the first half's pairs turn by column x theta_i, the second half's by
    row x theta_i, theta_i = base^(-2i/(d/2)); q . R(angle_k - angle_q) k pair by pair."""
    d = len(q)
    theta = base ** (-np.arange(0, d // 2, 2, dtype=np.float64) / (d // 2))
    total = 0.0
    for half, axis in ((0, 1), (1, 0)):  # the columns' half, then the rows'
        for i, t in enumerate(theta):
            j = half * d // 2 + 2 * i
            a = (k_cell[axis] - q_cell[axis]) * t
            total += (q[j] * (math.cos(a) * k[j] - math.sin(a) * k[j + 1])
                      + q[j + 1] * (math.sin(a) * k[j] + math.cos(a) * k[j + 1]))
    return total


def test_rope2d_scores_depend_on_the_2d_offset_only_and_match_the_formula(rng):
    width, d = 5, 16
    scheme = RoPE2D(grid_width=width)
    q, k = rng.standard_normal((2, d)).astype(np.float32)
    flat = lambda r, c: r * width + c  # noqa: E731
    for (r1, c1), (r2, c2), (dr, dc) in [((0, 0), (1, 2), (3, 1)), ((4, 4), (0, 1), (-2, -1)),
                                         ((2, 3), (2, 3), (1, -3))]:
        here = score(scheme, q, k, flat(r1, c1), flat(r2, c2))
        shifted = score(scheme, q, k, flat(r1 + dr, c1 + dc), flat(r2 + dr, c2 + dc))
        assert here == pytest.approx(shifted, abs=1e-4)
        assert here == pytest.approx(reference_score(q.astype(np.float64), k.astype(np.float64),
                                                     (r1, c1), (r2, c2), scheme.base), abs=1e-4)
    # The same flat offset is another 2-D offset across a row boundary: a different score.
    assert abs(score(scheme, q, k, flat(0, 4), flat(0, 3))
               - score(scheme, q, k, flat(1, 0), flat(0, 4))) > 1e-3


def test_rope2d_on_a_one_row_grid_is_rope_on_half_the_channels(rng):
    q = jnp.asarray(rng.standard_normal((2, 7, 3, 16)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((2, 7, 3, 16)), jnp.float32)
    positions = np.arange(7)
    two_d = RoPE2D(base=50.0, grid_width=7).rotate(q, k, positions, positions)
    one_d = RoPE(base=50.0, fraction=0.5).rotate(q, k, positions, positions)
    for a, b in zip(two_d, one_d):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_rope2d_refuses_a_missing_grid_or_an_odd_split():
    x = jnp.ones((1, 4, 1, 8))
    with pytest.raises(ValueError, match="grid_width"):
        RoPE2D().rotate(x, x, np.arange(4), np.arange(4))
    with pytest.raises(ValueError, match="multiple of 4"):
        RoPE2D(grid_width=2).rotate(jnp.ones((1, 4, 1, 6)), jnp.ones((1, 4, 1, 6)),
                                    np.arange(4), np.arange(4))


# ---------------------------------------------------------------------------------- the ViT

def test_vit_classifies_images_and_hands_its_grid_to_the_attention():
    model = ViT(**TINY_VIT, image_size=(8, 12), patch_size=4, channels=3)
    assert model.grid_shape == (2, 3) and model.num_patches == 6
    assert model.position_template.grid_width == 3
    pixels = jnp.asarray(np.random.default_rng(0).random((2, 8, 12, 3)), jnp.float32)
    variables = model.init(jax.random.PRNGKey(0), pixels)
    logits = model.apply(variables, pixels)
    assert logits.shape == (2, 10) and bool(jnp.all(jnp.isfinite(logits)))
    assert "token_embedding" not in variables["params"]  # no vocabulary, no MLM head
    with pytest.raises(ValueError, match="reads float32 images"):
        model.apply(variables, pixels[:, :4])


@pytest.mark.parametrize("bad, words", [
    (dict(num_classes=None), "NUM_CLASSES"), (dict(patch_size=3), "PATCH_SIZE"),
    (dict(pooling="first"), "class token")])
def test_vit_refuses_bad_fields_in_one_line(bad, words):
    with pytest.raises(ValueError, match=words):
        ViT(**{**TINY_VIT, **bad})


def test_the_objectives_refuse_the_other_kind_of_task():
    model = ViT(**TINY_VIT)
    with pytest.raises(ConfigError, match="ImageClassification"):
        Classification().prepare(model, data.DataConfig(task=images.DIGITS))
    with pytest.raises(ConfigError, match="not an image task"):
        ImageClassification().prepare(model, data.DataConfig(task="lexjax.stdlib_is_test"))
    with pytest.raises(ConfigError, match="TRAIN_LENGTH = 16"):
        ImageClassification().batch_spec(model, 4, 64)
    with pytest.raises(ConfigError, match="image_size"):
        ImageClassification().prepare(model, data.DataConfig(task=images.CIFAR10))


def test_ripple_vit_hands_its_grid_to_ripple_attention_and_refuses_a_relative_bias():
    from lexjax.models import RippleViT
    from lexjax.positions import T5Buckets
    model = RippleViT(**TINY_VIT, image_size=(8, 12), patch_size=4, ring_threshold=2)
    fields = model.decoder_layer_fields(model.mask, True, False)
    assert (fields["grid_height"], fields["grid_width"], fields["ring_threshold"]) == (2, 3, 2)
    pixels = jnp.asarray(np.random.default_rng(0).random((2, 8, 12, 1)), jnp.float32)
    variables = model.init(jax.random.PRNGKey(0), pixels)
    assert model.apply(variables, pixels).shape == (2, 10)
    rings = variables["params"]["layer_0"]["attention"]["ring_log_weights"]
    assert rings.value.shape == (TINY_VIT["num_heads"], 3)
    with pytest.raises(ValueError, match="relative bias"):
        RippleViT(**{**TINY_VIT, "position": T5Buckets()})


@pytest.fixture(scope="module", params=["vit", "vit_ripple"])
def vision_run(request, tmp_path_factory):
    """A tiny ViT (softmax, then Ripple) trained on the digits by the trainer, data parallel
    over every device."""
    from lexjax.runs import configured_training
    from lexjax.training import train

    model_dir = str(tmp_path_factory.mktemp("vision") / "run")
    parse_gin(["configs/runs/vision_quickstart.gin", f"configs/models/{request.param}.gin"],
              ["NUM_LAYERS = 2", "EMBED_DIM = 32", "NUM_HEADS = 4", "MLP_DIM = 64",
               "TRAIN_STEPS = 300", "BATCH_SIZE = 32", "LEARNING_RATE = 3e-3",
               "WARMUP_STEPS = 20", "LOG_EVERY = 50", "CHECKPOINT_EVERY = 300",
               "EVAL_EVERY = 0", "MESH = 'data:-1'"])
    try:
        metrics = train(*configured_training(), model_dir, progress=False)
    finally:
        gin.clear_config()
    return model_dir, metrics


def test_the_vit_learns_the_digits_through_the_trainer(vision_run):
    model_dir, metrics = vision_run
    with open(os.path.join(model_dir, "metrics.jsonl")) as f:
        losses = [json.loads(line)["loss"] for line in f if '"loss"' in line]
    assert losses[-1] < losses[0] - 1.0 and metrics["accuracy"] > 0.5


def test_evaluate_reports_accuracy_above_the_majority_baseline(vision_run):
    import lexjax.evaluate

    model_dir, _ = vision_run
    assert lexjax.evaluate.main([f"--model_dir={model_dir}", "--mesh=data:-1"]) == 0
    with open(os.path.join(model_dir, "eval", "classification.json")) as f:
        report = json.load(f)
    (row,) = report["rows"]
    assert report["task"] == images.DIGITS and row["examples"] == 359
    assert row["majority_baseline"] == pytest.approx(37 / 359)  # the largest class's share
    assert row["accuracy"] > 0.5
