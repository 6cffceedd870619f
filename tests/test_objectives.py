"""The training objectives (`lexjax.objectives`): BERT masking against its definition, the
masked-LM and classification losses against numpy, metrics against hand-worked values, and the
checks that keep an objective and its model consistent."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lexjax
from lexjax.data import DataConfig, get_vocabulary, segment_ids, word_roles
from lexjax.errors import ConfigError
from lexjax.objectives import CausalLM, Classification, MaskedLM, mask_tokens, unit_starts
from lexjax.objectives.classification import confusion_metrics

TINY = ["NUM_LAYERS=1", "EMBED_DIM=32", "NUM_HEADS=2", "MLP_DIM=64"]
DATA = DataConfig(task="lexjax.stdlib_code")


def encoder(*bindings):
    return lexjax.build_model(["configs/models/encoder.gin"], TINY + list(bindings))


def byte_ids(text: str) -> np.ndarray:
    return np.frombuffer(text.encode(), np.uint8).astype(np.int32) + 3


def test_masking_rates_and_replacements():
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, 259, (64, 512)), jnp.int32)
    segments = jnp.ones_like(tokens)
    starts = unit_starts(tokens, segments, "token")
    inputs, picked = mask_tokens(jax.random.PRNGKey(1), tokens, segments, starts, rate=0.15,
                                 mask_id=259, random_ids=(3, 259))
    inputs, picked, tokens = map(np.asarray, (inputs, picked, tokens))
    assert picked.mean() == pytest.approx(0.15, abs=0.005)
    masked = inputs[picked] == 259
    unchanged = inputs[picked] == tokens[picked]
    assert masked.mean() == pytest.approx(0.8, abs=0.02)
    assert unchanged.mean() == pytest.approx(0.1 + 0.1 / 256, abs=0.015)  # kept, or drew itself
    assert np.all(inputs[~picked] == tokens[~picked])
    assert np.all((inputs >= 3) & (inputs <= 259))


def test_masking_never_picks_padding_or_eos_and_is_a_function_of_the_key():
    rng = np.random.default_rng(2)
    tokens = rng.integers(3, 259, (8, 64))
    tokens[:, 40] = 1  # EOS
    tokens[:, 50:] = 0  # padding
    tokens = jnp.asarray(tokens, jnp.int32)
    segments = jnp.asarray(segment_ids(np.asarray(tokens)))
    starts = unit_starts(tokens, segments, "token")
    kwargs = dict(rate=0.9, mask_id=259, random_ids=(3, 259))
    inputs, picked = mask_tokens(jax.random.PRNGKey(0), tokens, segments, starts, **kwargs)
    assert not np.asarray(picked)[:, 50:].any() and not np.asarray(picked)[:, 40].any()
    again = mask_tokens(jax.random.PRNGKey(0), tokens, segments, starts, **kwargs)
    other = mask_tokens(jax.random.PRNGKey(1), tokens, segments, starts, **kwargs)
    assert np.array_equal(inputs, again[0]) and not np.array_equal(inputs, other[0])


def test_whole_word_masking_picks_words_entirely():
    text = "def foo_bar(self, x2):\n    return self.value + x2  # café ok\n" * 4
    tokens = jnp.asarray(byte_ids(text)[None], jnp.int32)
    segments = jnp.ones_like(tokens)
    table = jnp.asarray(word_roles(get_vocabulary()))
    starts = np.asarray(unit_starts(tokens, segments, "word", word_roles=table))[0]
    # Word starts by hand: a word character after a non-word character, and every other byte.
    word = [c == "_" or c.isalnum() or ord(c) >= 0x80 for c in text.encode().decode("latin-1")]
    expected = [i == 0 or not (word[i] and word[i - 1]) for i in range(len(word))]
    assert starts.tolist() == expected
    _, picked = mask_tokens(jax.random.PRNGKey(3), tokens, segments, jnp.asarray(starts[None]),
                            rate=0.5, mask_id=259, random_ids=(3, 259))
    picked = np.asarray(picked)[0]
    unit = np.cumsum(starts)
    for u in np.unique(unit):
        assert len(set(picked[unit == u])) == 1  # a word is masked entirely or not at all
    assert 0 < picked.mean() < 1


def test_whole_words_of_sentencepiece_pieces():
    """SentencePiece words: a piece with a leading "▁" starts one, the pieces after it without
    one continue it (the roles `word_roles` gives a SentencePiece vocabulary)."""
    roles = jnp.asarray([0, 0, 0, 1, 3, 1, 3, 3], jnp.int8)  # ids 3, 5: "▁hel", "▁wor"
    tokens = jnp.asarray([[3, 4, 5, 6, 7, 1, 3, 4]], jnp.int32)  # ▁hel lo ▁wor ld d EOS ▁hel lo
    segments = jnp.asarray([[1] * 6 + [2] * 2], jnp.int32)
    starts = np.asarray(unit_starts(tokens, segments, "word", word_roles=roles))[0]
    assert starts.tolist() == [True, False, True, False, False, True, True, False]


def test_span_masking_picks_aligned_spans():
    tokens = jnp.asarray(np.full((4, 30), 100), jnp.int32)
    segments = jnp.ones_like(tokens)
    phase = jnp.asarray([0, 1, 2, 0], jnp.int32)
    starts = np.asarray(unit_starts(tokens, segments, "span", span_length=3, phase=phase))
    for row, p in enumerate([0, 1, 2, 0]):
        assert np.flatnonzero(starts[row]).tolist() == [0] + [
            i for i in range(1, 30) if (i + p) % 3 == 0]


def test_a_new_segment_starts_a_unit():
    tokens = jnp.asarray(byte_ids("abcdefgh")[None], jnp.int32)
    segments = jnp.asarray([[1, 1, 1, 1, 2, 2, 2, 2]], jnp.int32)
    table = jnp.asarray(word_roles(get_vocabulary()))
    starts = np.asarray(unit_starts(tokens, segments, "word", word_roles=table))[0]
    assert starts.tolist() == [True, False, False, False, True, False, False, False]


def test_masked_lm_prepare_resolves_the_vocabulary():
    objective = MaskedLM().prepare(encoder(), DATA)
    assert objective.mask_id == 259 and objective.text_ids == (3, 259)
    table = objective.word_roles
    assert len(table) == 384 and table[ord("a") + 3] == 3 and table[ord(" ") + 3] == 0
    with pytest.raises(ConfigError, match="VOCAB_SIZE 259 leaves no id for the mask token"):
        MaskedLM().prepare(encoder("VOCAB_SIZE=259"), DATA)
    causal = lexjax.build_model(["configs/models/transformer.gin"], TINY)
    with pytest.raises(ConfigError, match="is causal"):
        MaskedLM().prepare(causal, DATA)
    with pytest.raises(ConfigError, match="is bidirectional"):
        CausalLM().prepare(encoder(), DATA)
    with pytest.raises(ConfigError, match="MASK_RATE"):
        MaskedLM(mask_rate=1.5)
    with pytest.raises(ConfigError, match="unit"):
        MaskedLM(unit="sentence")


def log_softmax64(logits):
    logits = np.asarray(logits, np.float64)
    top = logits.max(-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))


def test_masked_lm_loss_is_the_mean_over_masked_tokens():
    model = encoder()
    objective = MaskedLM(mask_rate=0.3).prepare(model, DATA)
    targets = np.random.default_rng(4).integers(3, 259, (2, 32))
    targets[1, 20:] = 0
    batch = {"targets": jnp.asarray(targets, jnp.int32),
             "segment_ids": jnp.asarray(segment_ids(targets))}
    params = model.init(jax.random.PRNGKey(0), batch["targets"])["params"]
    rng = jax.random.PRNGKey(7)
    loss, metrics, carry = objective.loss(model, params, batch, rng=rng)
    mask_key, _ = jax.random.split(rng)
    inputs, picked = objective.corrupt(mask_key, batch["targets"], batch["segment_ids"])
    logits = model.apply({"params": params}, inputs, segment_ids=batch["segment_ids"])
    logp = log_softmax64(logits)
    picked = np.asarray(picked)
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    assert carry is None and picked.any()
    assert float(loss) == pytest.approx(nll[picked].mean(), rel=1e-5)
    correct = (logp.argmax(-1) == targets)[picked].mean()
    assert float(metrics["masked_accuracy"]) == pytest.approx(correct)
    assert float(metrics["masked_fraction"]) == pytest.approx(picked.sum() / (targets > 0).sum())


def test_classification_loss_and_prepare():
    model = encoder("NUM_CLASSES=3")
    batch = {"inputs": jnp.asarray(np.random.default_rng(5).integers(3, 259, (4, 16)), jnp.int32),
             "segment_ids": jnp.ones((4, 16), jnp.int32),
             "label": jnp.asarray([0, 2, 1, 2], jnp.int32)}
    params = model.init(jax.random.PRNGKey(0), batch["inputs"])["params"]
    loss, metrics, _ = Classification().loss(model, params, batch, rng=jax.random.PRNGKey(0))
    logits = model.apply({"params": params}, batch["inputs"], segment_ids=batch["segment_ids"])
    logp = log_softmax64(logits)
    labels = np.asarray(batch["label"])
    assert float(loss) == pytest.approx(-logp[np.arange(4), labels].mean(), rel=1e-5)
    assert float(metrics["accuracy"]) == pytest.approx((logp.argmax(-1) == labels).mean())
    binary = DataConfig(task="lexjax.stdlib_is_test")
    with pytest.raises(ConfigError, match="set NUM_CLASSES = 2"):
        Classification().prepare(model, binary)
    assert Classification().prepare(encoder("NUM_CLASSES=2"), binary) == Classification()


def test_confusion_metrics_hand_worked():
    # rows: true class; columns: predicted. tp=40, fn=10, fp=5, tn=45.
    confusion = np.array([[45, 5], [10, 40]])
    scores = confusion_metrics(confusion)
    assert scores["accuracy"] == pytest.approx(85 / 100)
    assert scores["f1"] == pytest.approx(2 * 40 / (2 * 40 + 5 + 10))
    mcc = (40 * 45 - 5 * 10) / math.sqrt((40 + 5) * (40 + 10) * (45 + 5) * (45 + 10))
    assert scores["mcc"] == pytest.approx(mcc)
    three = np.array([[5, 0, 0], [0, 5, 0], [0, 0, 5]])
    assert confusion_metrics(three)["mcc"] == pytest.approx(1.0)
    assert "f1" not in confusion_metrics(three)
    assert confusion_metrics(np.array([[10, 0], [10, 0]]))["mcc"] == 0.0  # one predicted class


@pytest.mark.parametrize("mesh", ["", "data:2"])
def test_batch_evaluator_counts_every_example_once(mesh):
    """A last batch short of examples is filled up, and the filler rows are not counted."""
    from lexjax import partitioning
    from lexjax.evaluation.batches import BatchEvaluator

    def statistics(variables, batch, valid, key):
        keep = valid.astype(jnp.float32)
        return {"total": jnp.sum(batch["x"][:, 0] * keep), "count": jnp.sum(keep),
                "per_label": jnp.sum(jax.nn.one_hot(batch["label"], 3) * keep[:, None], 0)}

    devices = jax.devices()[:2] if mesh else jax.devices()[:1]
    evaluator = BatchEvaluator(statistics, batch_size=3,
                               mesh=partitioning.make_mesh(mesh, devices))
    examples = {"x": np.arange(10, dtype=np.float32)[:, None] * np.ones((1, 5), np.float32),
                "label": np.arange(10, dtype=np.int32) % 3}
    sums = evaluator(None, examples)
    assert sums["total"] == 45 and sums["count"] == 10
    assert sums["per_label"].tolist() == [4, 3, 3]


def exact_masks(key: int, tokens, segments, rate: float):
    """`mask_tokens` as late-[MASK] models use it: exact counts, every pick a [MASK] (259)."""
    from lexjax.objectives.masking import visible_length
    tokens, segments = jnp.asarray(tokens, jnp.int32), jnp.asarray(segments)
    return mask_tokens(jax.random.PRNGKey(key), tokens, segments,
                       unit_starts(tokens, segments, "token"), rate=rate, mask_id=259,
                       random_ids=(3, 259), keep_fraction=0.0, random_fraction=0.0,
                       visible=visible_length(tokens.shape[1], rate))


def test_visible_length_is_what_exact_masking_leaves():
    from lexjax.objectives.masking import visible_length
    for n in (1, 7, 16, 100, 512):
        for rate in (0.01, 0.15, 0.3, 0.5, 0.9):
            assert visible_length(n, rate) == n - math.floor(rate * n)
    assert visible_length(16, 0.5) == 8 and visible_length(10, 0.15) == 9
    assert visible_length(512, 0.5) == 256 and visible_length(7, 0.5) == 4


def test_exact_masking_picks_floor_rate_times_tokens_plus_u():
    """`visible=`: per row exactly floor(rate x eligible + u) tokens, u uniform (so the mean
    count is rate x eligible), all of them [MASK] with no 80/10/10, spread over the row."""
    from lexjax.objectives.masking import visible_length
    tokens = np.random.default_rng(3).integers(3, 259, (256, 64))
    visible = visible_length(64, 0.3)
    inputs, picked = map(np.asarray, exact_masks(5, tokens, np.ones_like(tokens), 0.3))
    counts = picked.sum(axis=1)
    assert set(counts.tolist()) == {19, 20}  # floor(0.3 x 64 + u) = 19 + (u >= 0.8)
    assert counts.mean() == pytest.approx(0.3 * 64, abs=0.1)
    assert np.all(64 - counts <= visible)
    assert np.all(inputs[picked] == 259) and np.all(inputs[~picked] == tokens[~picked])
    halves = picked.reshape(256, 2, 32).mean(axis=(0, 2))
    np.testing.assert_allclose(halves, 0.3, atol=0.03)


def test_exact_masking_with_padding_eos_and_many_documents():
    rng = np.random.default_rng(4)
    tokens = rng.integers(3, 259, (4, 64))
    tokens[0, 40] = 1  # EOS
    tokens[0, 50:] = 0  # padding: 49 eligible of 50 real tokens
    tokens[1, [10, 30, 63]] = 1  # three documents, no padding: 61 eligible
    tokens[2, ::4] = tokens[2, 1::4] = tokens[2, 2::4] = 1  # 16 eligible of 64
    tokens[3, 5:] = 0  # one short document without EOS (5 eligible)
    segments = segment_ids(tokens)
    inputs, picked = map(np.asarray, exact_masks(0, tokens, segments, 0.5))
    eligible = (segments > 0) & (tokens != 1)
    assert not np.any(picked & ~eligible)
    counts = picked.sum(axis=1)
    assert counts[0] in (24, 25)  # floor(0.5 x 49 + u); 50 - 32 = 18 fewer would do
    assert counts[1] == 32  # floor(0.5 x 61 + u) = 30 or 31, raised: at most 32 stay unpicked
    assert counts[2] == 16  # every eligible token (the 48 EOS still overflow the encoder)
    assert counts[3] in (2, 3)
    again = exact_masks(0, tokens, segments, 0.5)
    other = exact_masks(1, tokens, segments, 0.5)
    assert np.array_equal(picked, again[1]) and np.array_equal(inputs, again[0])
    assert not np.array_equal(picked, other[1])
