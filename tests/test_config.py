"""`lexjax.build_model` and gin: overrides in order, no state leaking between calls, clear
`ConfigError`s naming the culprit."""
import os

import gin
import pytest

import lexjax
from lexjax import ConfigError
from lexjax.attention import MaskSpec
from lexjax.config import parse_gin
from lexjax.models import Transformer
from lexjax.positions import ALiBi, Kerple, RoPE, Sandwich, XPos

MODEL_GIN = "configs/models/transformer.gin"
F = "lexjax.models.Transformer."


def test_file_values_without_bindings():
    model = lexjax.build_model([MODEL_GIN])
    assert isinstance(model, Transformer)
    assert (model.num_layers, model.embed_dim, model.num_heads, model.mlp_dim,
            model.vocab_size, model.dtype) == (6, 512, 8, 2048, 384, "float32")
    assert isinstance(model.position, RoPE)
    assert model.mask == MaskSpec() and model.inference_mask is None


def test_bindings_override_file_values():
    model = lexjax.build_model([MODEL_GIN], ["NUM_LAYERS=2", "EMBED_DIM=48", "NUM_HEADS=2",
                                             "DTYPE='bfloat16'", F + "norm='layernorm'"])
    assert (model.num_layers, model.embed_dim, model.num_heads, model.dtype, model.norm) == (
        2, 48, 2, "bfloat16", "layernorm")
    assert model.mlp_dim == 2048  # untouched values keep the file's


def test_later_bindings_override_earlier_ones():
    model = lexjax.build_model([MODEL_GIN], ["NUM_LAYERS=2", "NUM_LAYERS=3"])
    assert model.num_layers == 3


def test_later_gin_files_override_earlier_ones():
    after = lexjax.build_model([MODEL_GIN, "configs/positions/alibi.gin"])
    assert isinstance(after.position, ALiBi)
    before = lexjax.build_model(["configs/positions/alibi.gin", MODEL_GIN])
    assert isinstance(before.position, RoPE)  # the model gin's POSITION came last
    # Bindings come after every file.
    bound = lexjax.build_model([MODEL_GIN, "configs/positions/alibi.gin"],
                               ["POSITION=@lexjax.positions.Sandwich()"])
    assert isinstance(bound.position, Sandwich)


@pytest.mark.parametrize("scheme,cls", [("xpos", XPos), ("kerple", Kerple)])
def test_position_gin_files_select_their_scheme(scheme, cls):
    model = lexjax.build_model([MODEL_GIN, f"configs/positions/{scheme}.gin"])
    assert type(model.position) is cls


def test_scheme_parameters_bind_through_gin():
    model = lexjax.build_model([MODEL_GIN, "configs/positions/kerple.gin"],
                               ["lexjax.positions.Kerple.variant='power'"])
    assert model.position.variant == "power"
    learned = lexjax.build_model([MODEL_GIN, "configs/positions/learned.gin"],
                                 ["MAX_POSITIONS=77"])
    assert learned.position.max_length == 77


def test_build_model_twice_does_not_leak_state():
    first = lexjax.build_model(
        [MODEL_GIN, "configs/positions/xpos.gin", "configs/features/bca.gin"],
        ["NUM_LAYERS=2", "EMBED_DIM=48", "BCA_BLOCK=8", F + "dropout_rate=0.25",
         F + "norm='layernorm'", "lexjax.positions.XPos.scale_base=64.0",
         "lexjax.positions.RoPE.base=500.0"])
    assert (first.num_layers, first.embed_dim, first.dropout_rate, first.norm) == (
        2, 48, 0.25, "layernorm")
    assert first.inference_mask == MaskSpec(blockwise=8) and first.position.scale_base == 64.0

    second = lexjax.build_model([MODEL_GIN], ["NUM_LAYERS=3"])
    assert (second.num_layers, second.embed_dim, second.dropout_rate, second.norm) == (
        3, 512, 0.0, "rmsnorm")
    assert second.inference_mask is None
    assert isinstance(second.position, RoPE) and second.position.base == 10000.0
    # The first model keeps its own configuration.
    assert first.num_layers == 2 and first.position.scale_base == 64.0
    # Nothing stays bound in gin: objects built by hand get their defaults.
    assert gin.config_str().strip() == ""
    assert XPos().scale_base == 512.0 and RoPE().base == 10000.0 and MaskSpec().blockwise is None
    manual = Transformer(vocab_size=8, num_layers=1, embed_dim=8, num_heads=2, mlp_dim=8)
    assert manual.dropout_rate == 0.0 and manual.norm == "rmsnorm"


def test_model_does_not_change_when_gin_changes_later():
    model = lexjax.build_model([MODEL_GIN], ["NUM_LAYERS=2"])
    lexjax.build_model([MODEL_GIN], ["NUM_LAYERS=5", F + "mlp_dim=7"])
    assert model.num_layers == 2 and model.mlp_dim == 2048


def test_missing_gin_file_names_it():
    with pytest.raises(ConfigError, match="no_such_model.gin"):
        lexjax.build_model(["configs/models/no_such_model.gin"])
    with pytest.raises(ConfigError, match="nope_nope.gin"):
        lexjax.build_model([MODEL_GIN, "configs/positions/nope_nope.gin"])


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize("binding,name", [
    ("NoSuchThing.x = 1", "NoSuchThing"),
    (F + "no_such_field = 1", "no_such_field"),
    ("lexjax.positions.NoSuchScheme.base = 2", "NoSuchScheme"),
])
def test_unknown_binding_names_it(binding, name):
    with pytest.raises(ConfigError, match=name):
        lexjax.build_model([MODEL_GIN], [binding])
    # The failed call leaves gin clean for the next one.
    assert lexjax.build_model([MODEL_GIN], ["NUM_LAYERS=1"]).num_layers == 1


def test_syntax_error_in_binding_raises_config_error():
    with pytest.raises(ConfigError):
        lexjax.build_model([MODEL_GIN], ["NUM_LAYERS = = 2"])


def test_model_gin_without_model_raises_config_error(tmp_path):
    path = tmp_path / "no_model.gin"
    path.write_text("NUM_LAYERS = 2\nlexjax.models.Transformer.num_layers = %NUM_LAYERS\n")
    with pytest.raises(ConfigError, match="MODEL"):
        lexjax.build_model([str(path)])
    with pytest.raises(ConfigError, match="MODEL"):
        lexjax.build_model([])


def test_gin_files_resolve_from_another_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = lexjax.build_model([MODEL_GIN, "configs/positions/alibi.gin"], ["NUM_LAYERS=1"])
    assert isinstance(model.position, ALiBi) and model.num_layers == 1
    assert os.getcwd() == str(tmp_path)


def test_feature_gin_with_its_required_macro_set():
    model = lexjax.build_model(
        [MODEL_GIN, "configs/positions/xpos.gin", "configs/features/bca.gin"], ["BCA_BLOCK=64"])
    assert model.inference_mask == MaskSpec(blockwise=64) and model.mask == MaskSpec()


def test_missing_required_macro_is_named():
    with pytest.raises(ConfigError, match="BCA_BLOCK"):
        lexjax.build_model([MODEL_GIN, "configs/features/bca.gin"])


def test_missing_required_macro_still_raises_config_error():
    with pytest.raises(ConfigError):
        lexjax.build_model([MODEL_GIN, "configs/features/bca.gin"])


def test_platforms_skip_the_tpu_backend_only_on_hosts_without_tpu_chips(monkeypatch):
    from lexjax import _platforms

    monkeypatch.setattr(_platforms.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(_platforms, "has_tpu_chips", lambda: False)
    monkeypatch.setattr(_platforms, "local_platforms", lambda: "cpu")
    environ = {}
    _platforms.configure(environ)
    assert environ == {"JAX_PLATFORMS": "cpu", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
    chosen = {"JAX_PLATFORMS": "tpu"}
    _platforms.configure(chosen)  # the user's choice stands
    assert chosen["JAX_PLATFORMS"] == "tpu"
    monkeypatch.setattr(_platforms, "has_tpu_chips", lambda: True)
    on_tpu_vm = {}
    _platforms.configure(on_tpu_vm)
    assert on_tpu_vm == {}


def test_a_misspelt_macro_binding_is_named_with_the_closest_macro():
    from lexjax.config import check_bindings_used
    parse_gin(["configs/runs/quickstart.gin"], ["TRAIN_STEP=5"])
    with pytest.raises(ConfigError, match="TRAIN_STEP sets a macro.*did you mean TRAIN_STEPS"):
        check_bindings_used(["TRAIN_STEP=5"])
    sizes = ["CHUNK_SIZE=8", "NUM_LATENTS=8", "MAX_POSITIONS=64", "TRAIN_STEPS=3",
             "lexjax.models.Transformer.dropout_rate=0.1"]
    parse_gin(["configs/runs/quickstart.gin"], sizes)
    check_bindings_used(sizes)  # size macros another model reads may go unread here
    gin.clear_config()
