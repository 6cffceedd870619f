"""A converted checkpoint in use: a tiny Llama saved by transformers, converted with
`lexjax.convert`, fine-tuned for 20 steps with `--init_from` (the trainer as the CLI configures it,
from the converted run's own config.gin) and evaluated at 1x-8x its training length."""
from __future__ import annotations

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from helpers import write_corpus  # noqa: E402
from lexjax.config import parse_gin  # noqa: E402
from lexjax.convert import convert  # noqa: E402
from lexjax.evaluation.extrapolation import evaluate_lengths  # noqa: E402
from lexjax.runs import configured_training, load_run  # noqa: E402
from lexjax.training import train  # noqa: E402

LENGTH, STEPS = 16, 20


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(converted run directory, the transformers model)."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=384, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64)).eval()
    root = tmp_path_factory.mktemp("llama")
    model.save_pretrained(str(root / "hf"))
    convert(str(root / "hf"), str(root / "run"), log=lambda line: None)
    return str(root / "run"), model


@pytest.fixture(scope="module")
def finetuned(converted, tmp_path_factory):
    """The converted run fine-tuned for STEPS steps at LENGTH on a tiny local corpus."""
    run_dir, _ = converted
    mp = pytest.MonkeyPatch()
    mp.setenv("LEXJAX_DATA_CACHE", str(tmp_path_factory.mktemp("cache")))
    glob = write_corpus(str(tmp_path_factory.mktemp("corpus")))
    parse_gin([f"{run_dir}/config.gin", "configs/data/text_files.gin"],
              [f"TRAIN_STEPS = {STEPS}", f"TRAIN_LENGTH = {LENGTH}", "BATCH_SIZE = 4",
               "LEARNING_RATE = 1e-3", "WARMUP_STEPS = 2", "EVAL_EVERY = 0",
               f"CHECKPOINT_EVERY = {STEPS}", "LOG_EVERY = 1",
               "MIXTURE_OR_TASK_NAME = 'lexjax.text_files'", f"TEXT_FILES_GLOB = {glob!r}"])
    model, config = configured_training()
    out = str(tmp_path_factory.mktemp("finetuned"))
    try:  # the trainer writes the parsed gin config into the run directory
        result = train(model, config, out, init_from=run_dir, progress=False)
    finally:
        gin.clear_config()
    yield out, result
    mp.undo()


def test_converted_run_holds_the_checkpoint_logits(converted):
    """`load_run` of the converted directory gives transformers' logits."""
    run_dir, hf = converted
    tokens = np.random.default_rng(0).integers(0, 384, (2, 12))
    with torch.no_grad():
        want = hf(torch.tensor(tokens)).logits.numpy()
    run = load_run(run_dir)
    got = np.asarray(run.model.apply(run.variables, jnp.asarray(tokens, jnp.int32)))
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max())
    assert run.meta["parameters_only"] and run.step == 0


def test_finetuning_starts_from_the_converted_weights_and_learns(converted, finetuned):
    run_dir, _ = converted
    out, result = finetuned
    start, end = load_run(run_dir), load_run(out)
    assert end.step == STEPS
    moved = jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                                   start.variables["params"], end.variables["params"])
    # every parameter moved, by about what 20 Adam steps at 1e-3 allow (not re-initialised)
    assert all(0 < m < 0.1 for m in jax.tree_util.tree_leaves(moved))
    assert result["loss"] < np.log(384)  # below the uniform guess over the vocabulary


def test_finetuned_run_evaluates_at_one_to_eight_times_its_length(finetuned):
    out, _ = finetuned
    run = load_run(out)
    lengths = [LENGTH * f for f in (1, 2, 4, 8)]
    results = evaluate_lengths(run.model, run.variables, run.config.data, lengths,
                               max_tokens=512, batch_size=2)
    assert [r.length for r in results] == lengths
    assert all(np.isfinite(r.loss) and 0 < r.loss < np.log(384) + 1 for r in results)
