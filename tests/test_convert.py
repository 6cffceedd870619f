"""Hugging Face checkpoints converted into the zoo's own models (`lexjax.convert`), checked against
transformers itself: tiny randomly initialised PyTorch models (built from configs, nothing
downloaded) are saved with `save_pretrained`, converted, and must give the same logits as the
PyTorch model on the same tokens (relative max difference < 1e-4 in float32).

Covered: the seven architectures gpt2, llama, gpt_neox, bloom, mpt, roformer and deberta-v2 with
the options
the converter maps (grouped-query attention, rope scaling, tied embeddings, partial rotary,
sequential residuals, attention scales, ALiBi with a head count that is not a power of two;
DeBERTa's own position projections, plain clipped distances and token types), rope
options spelled as older configs spell them, the checkpoint formats the reader takes (bfloat16,
sharded, PyTorch `.bin`), the CLI end to end, placement on a device mesh, and the one-line errors
for bad input.

The PyTorch weights are spread wider than transformers' initialisation (std 0.02), so attention
is far from uniform and positions, attention scales and ALiBi slopes change the logits.
"""
from __future__ import annotations

import copy
import glob
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import lexjax  # noqa: E402
from lexjax.convert import (SUPPORTED, CheckpointFormatError, UnsupportedCheckpoint,  # noqa: E402
                            convert, from_hf)
from lexjax.convert.architectures import (interleave_rotary_channels,  # noqa: E402
                                          mpt_alibi_slopes)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 256
TOKENS = np.random.default_rng(0).integers(0, VOCAB, (2, 24))
TOLERANCE = 1e-4  # max |difference| relative to max |logit|
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=128)


# -- tiny transformers models ---------------------------------------------------------------------
def gpt2(**options):
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256, **options))


def llama(**options):
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **COMMON, max_position_embeddings=256, **options))


def gpt_neox(**options):
    options.setdefault("rotary_pct", 1.0)
    return transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        **COMMON, max_position_embeddings=256, **options))


def bloom(heads=4, hidden=64):
    return transformers.BloomForCausalLM(transformers.BloomConfig(
        vocab_size=VOCAB, hidden_size=hidden, n_layer=2, n_head=heads))


def mpt(heads=4, hidden=64, **options):
    return transformers.MptForCausalLM(transformers.MptConfig(
        vocab_size=VOCAB, d_model=hidden, n_layers=2, n_heads=heads, max_seq_len=256, **options))


def roformer():
    return transformers.RoFormerForMaskedLM(transformers.RoFormerConfig(
        **COMMON, max_position_embeddings=256))


def deberta_v2(**options):
    values = dict(relative_attention=True, position_buckets=32, max_relative_positions=128,
                  pos_att_type=["p2c", "c2p"], position_biased_input=False,
                  norm_rel_ebd="layer_norm", share_att_key=True)
    values.update(options)
    return transformers.DebertaV2ForMaskedLM(transformers.DebertaV2Config(
        **COMMON, max_position_embeddings=256, **values))


LLAMA3_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=32, rope_theta=10000.0)

# case name -> a tiny transformers model. transformers 5 takes rope scaling as `rope_parameters`
# (written so into config.json); the linear case passes the older `rope_scaling` spelling.
MODELS = {
    "gpt2": gpt2,
    "gpt2-inverse-layer-idx": lambda: gpt2(scale_attn_by_inverse_layer_idx=True),
    "gpt2-exact-gelu": lambda: gpt2(activation_function="gelu"),
    "llama": llama,
    "llama-gqa": lambda: llama(num_key_value_heads=2),
    "llama-rope-linear": lambda: llama(rope_scaling={"type": "linear", "factor": 2.0}),
    "llama-rope-llama3": lambda: llama(rope_parameters=dict(LLAMA3_ROPE)),
    "llama-tied": lambda: llama(tie_word_embeddings=True),
    "gpt_neox": gpt_neox,
    "gpt_neox-sequential": lambda: gpt_neox(use_parallel_residual=False),
    "gpt_neox-rotary-quarter": lambda: gpt_neox(rotary_pct=0.25),
    "bloom": bloom,
    "bloom-6-heads": lambda: bloom(heads=6, hidden=96),
    "mpt": mpt,
    "mpt-6-heads": lambda: mpt(heads=6, hidden=96),
    "mpt-softmax-scale": lambda: mpt(attn_config={"softmax_scale": 0.3}),
    "roformer": roformer,
    "deberta_v2": deberta_v2,
    "deberta_v2-own-position-projections-c2p": lambda: deberta_v2(share_att_key=False,
                                                                 pos_att_type=["c2p"]),
    "deberta_v2-v1-distances-token-types": lambda: deberta_v2(position_buckets=-1,
                                                             max_relative_positions=16,
                                                             type_vocab_size=2),
}


def build(name: str, spread: float = 0.2):
    """The case's model, seeded, every parameter moved by N(0, spread^2), in eval mode."""
    torch.manual_seed(0)
    model = MODELS[name]()
    with torch.no_grad():
        for parameter in model.parameters():  # tied parameters are listed once
            if parameter.requires_grad:  # not fixed tables (RoFormer's sinusoids)
                parameter.add_(spread * torch.randn_like(parameter))
    return model.eval()


def reference_logits(model, tokens=TOKENS) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.float().numpy()


def lexjax_logits(model, variables, tokens=TOKENS) -> np.ndarray:
    return np.asarray(jax.jit(model.apply)(variables, jnp.asarray(tokens, jnp.int32)),
                      np.float32)


def assert_same_logits(got: np.ndarray, reference: np.ndarray):
    assert got.shape == reference.shape
    error = float(np.max(np.abs(got - reference))) / float(np.max(np.abs(reference)))
    assert error < TOLERANCE, f"relative max difference {error:.2e}"


def save_config(directory, config: dict) -> str:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    return str(directory)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """`checkpoint(name)` -> (directory written by save_pretrained, the PyTorch logits on
    TOKENS), built once per module (per test worker)."""
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            model = build(name)
            directory = str(tmp_path_factory.mktemp(name))
            model.save_pretrained(directory)
            cache[name] = directory, reference_logits(model)
        return cache[name]

    return get


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """`python -m lexjax.convert ARGS` on the CPU (the environment this test process runs in)."""
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    return subprocess.run([sys.executable, "-m", "lexjax.convert", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def assert_one_line_error(process: subprocess.CompletedProcess, *words: str):
    assert process.returncode == 2, process.stderr
    lines = process.stderr.strip().splitlines()
    assert len(lines) == 1, process.stderr
    for word in words:
        assert word in lines[0]


# -- logit parity ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(MODELS))
def test_from_hf_logits_equal_transformers(checkpoint, name):
    """`from_hf` gives the zoo's model whose logits equal the transformers model's, for each of
    every architecture and each option the converter maps."""
    directory, reference = checkpoint(name)
    model, variables = from_hf(directory)
    assert_same_logits(lexjax_logits(model, variables), reference)


def test_every_supported_architecture_is_covered():
    """The parity cases above cover every architecture the converter supports."""
    covered = {name.split("-")[0].replace("deberta_v2", "deberta-v2") for name in MODELS}
    assert covered == set(SUPPORTED)


# Configs as transformers 4 wrote them (and most Hub checkpoints hold): rope scaling under
# `rope_scaling`, the base as `rope_theta` / `rotary_emb_base`, GPT-NeoX's `rotary_pct`.
OLDER_CONFIGS = {
    "llama-rope-linear": dict(rope_scaling={"type": "linear", "factor": 2.0},
                              rope_theta=10000.0),
    "llama-rope-llama3": dict(rope_scaling={k: v for k, v in LLAMA3_ROPE.items()
                                            if k != "rope_theta"}, rope_theta=10000.0),
    "gpt_neox-rotary-quarter": dict(rotary_pct=0.25, rotary_emb_base=10000),
}


@pytest.mark.parametrize("name", list(OLDER_CONFIGS))
def test_older_config_spellings_give_the_same_logits(checkpoint, tmp_path, name):
    """The same weights with the rope options spelled as in transformers 4 configs (no
    `rope_parameters`) convert to the same logits."""
    directory, reference = checkpoint(name)
    with open(os.path.join(directory, "config.json")) as f:
        config = json.load(f)
    del config["rope_parameters"]
    config.update(OLDER_CONFIGS[name])
    save_config(tmp_path, config)
    shutil.copyfile(os.path.join(directory, "model.safetensors"),
                    os.path.join(str(tmp_path), "model.safetensors"))
    model, variables = from_hf(str(tmp_path))
    assert_same_logits(lexjax_logits(model, variables), reference)


# -- checkpoint formats ---------------------------------------------------------------------------
def save_bfloat16(model, directory) -> np.ndarray:
    """Saves the model in bfloat16; returns the float32 logits of its bfloat16-rounded weights
    (rounded parameters only: `.float()` of the bfloat16 model would keep rounded rotary
    frequency buffers too, which no checkpoint stores)."""
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(directory)
    with open(os.path.join(directory, "model.safetensors"), "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in rounded.parameters():
            parameter.copy_(parameter.to(torch.bfloat16).float())
    return reference_logits(rounded)


def save_sharded(model, directory) -> np.ndarray:
    model.save_pretrained(directory, max_shard_size="20KB")
    assert os.path.isfile(os.path.join(directory, "model.safetensors.index.json"))
    assert len(glob.glob(os.path.join(directory, "model-*.safetensors"))) > 2
    return reference_logits(model)


def save_pytorch_bin(model, directory, dtype=torch.float32) -> np.ndarray:
    """The layout of older checkpoints: config.json and a pickled state dict (of `dtype`)."""
    model.config.save_pretrained(directory)
    state = {name: tensor.to(dtype) if tensor.is_floating_point() else tensor
             for name, tensor in model.state_dict().items()}
    torch.save(state, os.path.join(directory, "pytorch_model.bin"))
    assert not glob.glob(os.path.join(directory, "*.safetensors"))
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in rounded.parameters():
            parameter.copy_(parameter.to(dtype).float())
    return reference_logits(rounded)


def save_pytorch_bin_bfloat16(model, directory) -> np.ndarray:
    return save_pytorch_bin(model, directory, torch.bfloat16)


@pytest.fixture(scope="module")
def llama_gqa():
    return build("llama-gqa")


@pytest.mark.parametrize(
    "save", [save_bfloat16, save_sharded, save_pytorch_bin, save_pytorch_bin_bfloat16],
    ids=["bfloat16", "sharded", "pytorch_bin", "pytorch_bin_bfloat16"])
def test_checkpoint_formats_give_the_same_logits(llama_gqa, tmp_path, save):
    """bfloat16 safetensors, shards listed by an index, and PyTorch `.bin` state dicts (float32
    or bfloat16) are all read to the logits of the model they hold."""
    reference = save(llama_gqa, str(tmp_path))
    model, variables = from_hf(str(tmp_path))
    assert_same_logits(lexjax_logits(model, variables), reference)


# -- the CLI and the run directory ----------------------------------------------------------------
def test_cli_writes_a_run_that_loads_to_the_same_logits(checkpoint, tmp_path):
    """`python -m lexjax.convert` exits 0 and writes a run directory whose `lexjax.load` model
    gives the transformers logits and whose config.gin builds the zoo's Transformer; converting
    into it again is refused with one line and exit code 2."""
    directory, reference = checkpoint("llama-gqa")
    out = str(tmp_path / "run")
    process = run_cli(f"--from_hf={directory}", f"--model_dir={out}")
    assert process.returncode == 0, process.stderr
    with open(os.path.join(out, "config.gin")) as f:
        assert "lexjax.models.Transformer" in f.read()
    model, variables = lexjax.load(out)
    assert_same_logits(lexjax_logits(model, variables), reference)

    again = run_cli(f"--from_hf={directory}", f"--model_dir={out}")
    assert_one_line_error(again, out)


def test_convert_onto_a_mesh(checkpoint, tmp_path):
    """Parameters placed on a data x fsdp x tensor mesh of the 8 test devices as they are read
    still make a run whose loaded logits equal transformers'. (A mesh must use every device:
    "fsdp:2,tensor:2" alone is refused with 8.)"""
    directory, reference = checkpoint("llama-gqa")
    out = str(tmp_path / "run")
    logs: list = []
    text = convert(directory, out, mesh_spec="data:2,fsdp:2,tensor:2", log=logs.append)
    assert "lexjax.models.Transformer" in text
    assert any("converted" in line for line in logs)
    model, variables = lexjax.load(out)
    assert_same_logits(lexjax_logits(model, variables), reference)


# -- bad input ------------------------------------------------------------------------------------
def one_line(error: pytest.ExceptionInfo) -> str:
    text = str(error.value)
    assert "\n" not in text
    return text


def test_directory_without_config_json(tmp_path):
    """A directory without config.json is refused, naming the file."""
    with pytest.raises(CheckpointFormatError) as error:
        from_hf(str(tmp_path))
    assert "config.json" in one_line(error)


def test_unsupported_architecture_saved_by_transformers(tmp_path):
    """A saved BERT is refused, naming its model_type and the supported ones."""
    torch.manual_seed(0)
    transformers.BertForMaskedLM(transformers.BertConfig(
        **COMMON, max_position_embeddings=64)).save_pretrained(str(tmp_path))
    with pytest.raises(UnsupportedCheckpoint) as error:
        from_hf(str(tmp_path))
    text = one_line(error)
    assert "'bert'" in text
    for name in SUPPORTED:
        assert name in text


def test_unsupported_model_type_in_config_json(tmp_path):
    """A config.json with model_type t5 is refused, naming t5 and listing gpt2 and llama."""
    directory = save_config(tmp_path, {"model_type": "t5", "architectures": ["T5Model"]})
    with pytest.raises(UnsupportedCheckpoint) as error:
        from_hf(directory)
    text = one_line(error)
    assert "'t5'" in text and "gpt2" in text and "llama" in text


def test_missing_shard(llama_gqa, tmp_path):
    """A sharded checkpoint with one shard deleted is refused, naming the missing shard."""
    llama_gqa.save_pretrained(str(tmp_path), max_shard_size="20KB")
    shard = sorted(glob.glob(os.path.join(str(tmp_path), "model-*.safetensors")))[1]
    os.remove(shard)
    with pytest.raises(CheckpointFormatError) as error:
        from_hf(str(tmp_path))
    assert os.path.basename(shard) in one_line(error)


def test_truncated_safetensors(checkpoint, tmp_path):
    """A safetensors file cut short is refused as truncated, naming the file."""
    directory, _ = checkpoint("gpt2")
    target = tmp_path / "truncated"
    target.mkdir()
    for name in ("config.json", "model.safetensors"):
        with open(os.path.join(directory, name), "rb") as f:
            data = f.read()
        if name == "model.safetensors":
            data = data[:len(data) // 2]
        (target / name).write_bytes(data)
    with pytest.raises(CheckpointFormatError) as error:
        from_hf(str(target))
    text = one_line(error)
    assert "truncated" in text and "model.safetensors" in text


def test_safetensors_shorter_than_its_header(tmp_path):
    """A safetensors file too short to hold its header size is refused as not safetensors."""
    transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4).save_pretrained(
        str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00")
    with pytest.raises(CheckpointFormatError) as error:
        from_hf(str(tmp_path))
    assert "model.safetensors" in one_line(error)


def test_llama_with_gelu_is_refused(tmp_path):
    """A Llama with hidden_act gelu has no equivalent in the zoo: refused naming the option."""
    transformers.LlamaConfig(**COMMON, hidden_act="gelu").save_pretrained(str(tmp_path))
    with pytest.raises(UnsupportedCheckpoint) as error:
        from_hf(str(tmp_path))
    text = one_line(error)
    assert "hidden_act" in text and "gelu" in text


# -- layout helpers -------------------------------------------------------------------------------
def test_interleave_rotary_channels_hand_example():
    """With rotary_dim 8 of head_dim 10, the half-split pairs (i, i + 4) become neighbours
    (2i, 2i + 1) and the two channels past the rotary ones stay last; leading axes are kept."""
    x = np.arange(20).reshape(2, 10)
    expected = np.array([0, 4, 1, 5, 2, 6, 3, 7, 8, 9])
    np.testing.assert_array_equal(interleave_rotary_channels(x, 8),
                                  np.stack([expected, expected + 10]))


def rotate_half_split(x, angles):
    """Llama/GPT-NeoX rotary: channel i turns with channel i + r/2 by angles[i]."""
    half = len(angles)
    a, b = x[:half], x[half:2 * half]
    return np.concatenate([a * np.cos(angles) - b * np.sin(angles),
                           b * np.cos(angles) + a * np.sin(angles), x[2 * half:]])


def rotate_neighbours(x, angles):
    """The zoo's rotary: channel 2i turns with channel 2i + 1 by angles[i]."""
    y = x.copy()
    a, b = x[0:2 * len(angles):2], x[1:2 * len(angles):2]
    y[0:2 * len(angles):2] = a * np.cos(angles) - b * np.sin(angles)
    y[1:2 * len(angles):2] = b * np.cos(angles) + a * np.sin(angles)
    return y


def test_interleaving_turns_half_split_rotary_into_neighbour_rotary():
    """Rotating half-split pairs and then interleaving equals interleaving and then rotating
    neighbour pairs, so converted queries and keys see the same rotation."""
    rng = np.random.default_rng(0)
    x, angles = rng.normal(size=10), rng.uniform(0, 6, size=3)
    np.testing.assert_allclose(interleave_rotary_channels(rotate_half_split(x, angles), 6),
                               rotate_neighbours(interleave_rotary_channels(x, 6), angles),
                               atol=1e-12)


def test_mpt_alibi_slopes_hand_formula():
    """MPT's slopes for 6 heads: 2^-(i * 8 / 8) for i = 1..8 (the next power of two), the
    odd-indexed ones first, then the even-indexed ones, cut at 6; 4 heads keep the plain
    order."""
    slopes = [2.0 ** -(i * 8 / 8) for i in range(1, 9)]
    expected = (slopes[1::2] + slopes[0::2])[:6]
    assert expected == [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3]
    np.testing.assert_allclose(mpt_alibi_slopes(6, 8), expected, rtol=1e-7)
    np.testing.assert_allclose(mpt_alibi_slopes(4, 8), [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8],
                               rtol=1e-7)
