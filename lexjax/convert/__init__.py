"""Hugging Face checkpoints as lexjax runs.

    python -m lexjax.convert --from_hf=DIR --model_dir=OUT [--mesh=data:2,tensor:4]
    model, variables = lexjax.from_hf(DIR)

DIR is a directory written by `save_pretrained` (config.json and safetensors or PyTorch weights,
sharded or not). The converted model is one of the zoo's own (`architectures.py` says which and
how: a Llama is a `Transformer` with RoPE, SwiGLU, RMSNorm, grouped-query attention and untied
logits), so everything that takes a run directory takes OUT: `lexjax.load`, `evaluate`,
`generate`, `bench`, and `train --init_from=OUT` to fine-tune.

OUT holds `config.gin` (the model's fields plus a run config on the embedded corpus, as a
quickstart run writes; its objective follows the checkpoint: causal LM or masked LM), one
checkpoint of the parameters alone (step 0, no optimizer state: train elsewhere with
`--init_from`), and the tokenizer the checkpoint ships (`tokenizer.model`: SentencePiece;
`tokenizer.json`: the `tokenizers` library's format), or the byte vocabulary where none is.
Tensors are read one at a time and placed straight into their sharding on `--mesh`.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Optional

import numpy as np

from lexjax.convert.architectures import (ARCHITECTURES, Conversion, GinObject, Lookup,
                                          UnsupportedCheckpoint)
from lexjax.convert.reader import CheckpointFormatError, CheckpointReader
from lexjax.errors import UserError

BYTE_VOCAB_SIZE = 259  # lexjax.data.vocab's byte vocabulary (not imported: it loads TensorFlow)

__all__ = ["from_hf", "convert", "read_conversion", "model_gin", "SUPPORTED",
           "UnsupportedCheckpoint", "CheckpointFormatError"]

SUPPORTED = tuple(ARCHITECTURES)
# Tensors some checkpoints carry that are not parameters (attention-mask buffers, cached
# rotary tables).
BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq",
                   "embed_positions.weight", ".masked_bias")


def read_config(directory: str) -> dict:
    """`DIR/config.json` as a dict, with one-line errors for a missing or foreign file."""
    path = os.path.join(directory, "config.json")
    if not os.path.isdir(directory):
        raise CheckpointFormatError(f"--from_hf {directory!r} is not a directory")
    if not os.path.isfile(path):
        raise CheckpointFormatError(f"{directory} has no config.json: not a Hugging Face "
                                    "checkpoint directory (write one with save_pretrained)")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise CheckpointFormatError(f"{path} is not valid JSON ({e.msg}, line {e.lineno})")


def read_conversion(directory: str) -> tuple[Conversion, str]:
    """`(conversion, base-model tensor prefix)` of the checkpoint in `directory`."""
    config = read_config(directory)
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise UnsupportedCheckpoint(
            f"{os.path.join(directory, 'config.json')}: architecture {model_type!r} "
            f"({', '.join(config.get('architectures') or [])}) is not supported; supported: "
            f"{', '.join(SUPPORTED)}")
    converter, prefix = ARCHITECTURES[model_type]
    return converter(config), prefix


# -- config.gin ---------------------------------------------------------------------------------
def gin_value(value: Any, bindings: list[str]) -> str:
    """A field value as gin text; a `GinObject`'s own bindings are appended to `bindings`."""
    if isinstance(value, GinObject):
        for name, inner in value.bindings.items():
            bindings.append(f"{value.name}.{name} = {gin_value(inner, bindings)}")
        return f"@{value.name}()"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, tuple):
        return "(" + ", ".join(gin_value(v, bindings) for v in value) + ",)"
    return repr(value)


# Model fields that the run gins' size macros set.
FIELD_MACROS = {"vocab_size": "VOCAB_SIZE", "num_layers": "NUM_LAYERS", "embed_dim": "EMBED_DIM",
                "num_heads": "NUM_HEADS", "mlp_dim": "MLP_DIM", "position": "POSITION"}


def model_gin(conversion: Conversion) -> str:
    """The gin text that builds the converted model (`MODEL`), in the zoo's own terms."""
    cls = f"lexjax.models.{conversion.model}"
    macros, objects, fields = [], [], []
    for name, value in conversion.fields.items():
        text = gin_value(value, objects)
        if name in FIELD_MACROS:
            macros.append(f"{FIELD_MACROS[name]} = {text}")
            fields.append(f"{cls}.{name} = %{FIELD_MACROS[name]}")
        else:
            fields.append(f"{cls}.{name} = {text}")
    macros.append('DTYPE = "float32"')
    fields.append(f"{cls}.dtype = %DTYPE")
    return "\n".join(["# The converted model: the zoo's own modules, fields from config.json.",
                      *macros, *objects, f"MODEL = @{cls}()", *fields, ""])


RUN_GIN = """
# A run on the embedded corpus (as configs/runs/quickstart.gin); fine-tune with
# python -m lexjax.train --gin_file=THIS_DIR/config.gin --init_from=THIS_DIR --model_dir=NEW
import lexjax.data
import lexjax.objectives

MIXTURE_OR_TASK_NAME = "lexjax.stdlib_code"
TRAIN_STEPS = 1000
BATCH_SIZE = 8
TRAIN_LENGTH = {train_length}
CHECKPOINT_EVERY = 200
LOG_EVERY = 20
EVAL_EVERY = 200
LEARNING_RATE = 1e-4
WARMUP_STEPS = 50
MESH = ""
SEED = 0

lexjax.training.train.model = %MODEL
lexjax.training.train.config = @lexjax.training.TrainConfig()
lexjax.training.TrainConfig.data = @lexjax.data.DataConfig()
lexjax.training.TrainConfig.train_steps = %TRAIN_STEPS
lexjax.training.TrainConfig.batch_size = %BATCH_SIZE
lexjax.training.TrainConfig.train_length = %TRAIN_LENGTH
lexjax.training.TrainConfig.checkpoint_every = %CHECKPOINT_EVERY
lexjax.training.TrainConfig.log_every = %LOG_EVERY
lexjax.training.TrainConfig.eval_every = %EVAL_EVERY
lexjax.training.TrainConfig.mesh = %MESH
lexjax.training.TrainConfig.seed = %SEED
lexjax.training.TrainConfig.optimizer = @lexjax.training.OptimizerConfig()
lexjax.training.OptimizerConfig.learning_rate = %LEARNING_RATE
lexjax.training.OptimizerConfig.warmup_steps = %WARMUP_STEPS
lexjax.data.DataConfig.task = %MIXTURE_OR_TASK_NAME
{data}{objective}"""


def tokenizer_bindings(directory: str, model_dir: Optional[str]) -> tuple[str, list[str]]:
    """The DataConfig bindings for the checkpoint's tokenizer, and the files to copy into the
    run directory: SentencePiece (`tokenizer.model`), a `tokenizer.json`, or bytes."""
    if os.path.isfile(os.path.join(directory, "tokenizer.model")):
        path = os.path.abspath(os.path.join(model_dir or directory, "tokenizer.model"))
        return (f'lexjax.data.DataConfig.vocabulary = "sentencepiece"\n'
                f'lexjax.data.DataConfig.sentencepiece_model = "{path}"\n', ["tokenizer.model"])
    if os.path.isfile(os.path.join(directory, "tokenizer.json")):
        path = os.path.abspath(os.path.join(model_dir or directory, "tokenizer.json"))
        files = ["tokenizer.json"] + [name for name in ("tokenizer_config.json",)
                                      if os.path.isfile(os.path.join(directory, name))]
        return (f'lexjax.data.DataConfig.vocabulary = "tokenizer_json"\n'
                f'lexjax.data.DataConfig.tokenizer_file = "{path}"\n', files)
    return "", []


def run_gin(conversion: Conversion, data: str) -> str:
    objective = ("lexjax.training.TrainConfig.objective = @lexjax.objectives.MaskedLM()\n"
                 if conversion.objective == "mlm" else "")
    return RUN_GIN.format(train_length=min(conversion.max_positions, 1024), data=data,
                          objective=objective)


# -- parameters ---------------------------------------------------------------------------------
def _path_text(path: tuple[str, ...]) -> str:
    return "/".join(path)


def converted_params(conversion: Conversion, lookup: Lookup, abstract: Any,
                     place=None) -> dict:
    """The model's parameter tree from the checkpoint, checked leaf by leaf against `abstract`
    (the model's `ShapeDtypeStruct`s, with shardings when `place` puts arrays on a mesh).
    `place(array, target)` -> the placed array (default: keep numpy)."""
    import jax
    expected = {tuple(k.key for k in path): leaf for path, leaf in
                jax.tree_util.tree_flatten_with_path(abstract)[0]}
    params: dict = {}
    for path, array in conversion.tensors(lookup):
        target = expected.pop(path, None)
        if target is None:
            raise UnsupportedCheckpoint(f"internal layout mismatch: the converter produced "
                                        f"{_path_text(path)}, which the model does not have")
        if tuple(array.shape) != tuple(target.shape):
            raise CheckpointFormatError(
                f"tensor for {_path_text(path)} has shape {tuple(array.shape)}, the config "
                f"implies {tuple(target.shape)}: config.json and the weights disagree")
        array = np.asarray(array, np.float32)
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = place(array, target) if place else array
    if expected:
        missing = ", ".join(_path_text(p) for p in list(expected)[:5])
        raise UnsupportedCheckpoint(f"internal layout mismatch: no tensor for {missing}")
    return params


def unused_tensors(reader: CheckpointReader, lookup: Lookup) -> list[str]:
    """Checkpoint tensors the conversion did not read (other than known buffers)."""
    return [n for n in reader.names()
            if n not in lookup.used and not n.endswith(BUFFER_SUFFIXES)]


def abstract_params(model, mesh=None, rules=None):
    """The model's parameters as `ShapeDtypeStruct`s (sharded on `mesh` by `rules` if given)."""
    import jax
    import jax.numpy as jnp
    from lexjax import partitioning
    boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                           jax.ShapeDtypeStruct((1, 8), jnp.int32))["params"]
    mesh = mesh or partitioning.make_mesh("", jax.devices()[:1])
    return partitioning.sharded_abstract(boxed, mesh, rules or partitioning.LOGICAL_AXIS_RULES)


def from_hf(directory: str) -> tuple[Any, dict]:
    """`(model, variables)` of the Hugging Face checkpoint in `directory`: the zoo's model
    with the checkpoint's weights (float32, on the default device)."""
    import jax.numpy as jnp
    from lexjax.config import build_model
    conversion, prefix = read_conversion(directory)
    reader = CheckpointReader(directory)
    model = build_model(bindings=[model_gin(conversion)])
    params = converted_params(conversion, Lookup(reader, prefix), abstract_params(model),
                              place=lambda a, t: jnp.asarray(a))
    return model, {"params": params}


def convert(directory: str, model_dir: str, mesh_spec: str = "", log=print) -> str:
    """Writes the run directory `model_dir` from the checkpoint in `directory` (see the module
    docstring); returns the config.gin text. Tensors are placed on the mesh `mesh_spec`
    ("": one device) as they are read."""
    import jax

    from lexjax import partitioning
    from lexjax.config import build_model
    from lexjax.training.checkpoints import Checkpointer
    from lexjax.training.state import params_fingerprint

    conversion, prefix = read_conversion(directory)
    reader = CheckpointReader(directory)
    if os.path.isdir(os.path.join(model_dir, "checkpoints")):
        raise UserError(f"{model_dir} already holds checkpoints; convert into a new --model_dir")
    data, tokenizer_files = tokenizer_bindings(directory, model_dir)
    text = model_gin(conversion) + run_gin(conversion, data)
    model = build_model(bindings=[model_gin(conversion)])
    mesh = (partitioning.make_mesh(mesh_spec) if mesh_spec
            else partitioning.make_mesh("", jax.devices()[:1]))
    abstract = abstract_params(model, mesh)
    lookup = Lookup(reader, prefix)
    params = converted_params(conversion, lookup, abstract,
                              place=lambda a, t: jax.device_put(a, t.sharding))
    vocab = conversion.fields["vocab_size"]
    if not tokenizer_files and vocab < BYTE_VOCAB_SIZE:
        log(f"warning: {directory} ships no tokenizer, so the run reads bytes ({BYTE_VOCAB_SIZE} "
            f"ids), but the model has {vocab}: give the run the model's tokenizer "
            "(lexjax.data.DataConfig) before training or evaluating it on text")
    unused = unused_tensors(reader, lookup)
    if unused:
        log(f"warning: {len(unused)} checkpoint tensors have no place in the converted model "
            f"and were left out: {', '.join(unused[:8])}{' ...' if len(unused) > 8 else ''}")
    os.makedirs(model_dir, exist_ok=True)
    for name in tokenizer_files:
        shutil.copyfile(os.path.join(directory, name), os.path.join(model_dir, name))
    meta = dict(model=type(model).__name__, fingerprint=params_fingerprint(abstract),
                train_length=min(conversion.max_positions, 1024), task="lexjax.stdlib_code",
                objective="MaskedLM" if conversion.objective == "mlm" else "CausalLM", step=0,
                parameters_only=True, converted_from=os.path.abspath(directory))
    checkpointer = Checkpointer(model_dir)
    checkpointer.save_params(0, params, meta)
    checkpointer.close()
    with open(os.path.join(model_dir, "config.gin"), "w") as f:
        f.write(text)
    count = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(abstract))
    log(f"converted {read_config(directory).get('model_type')} ({count / 1e6:.2f}M parameters) "
        f"into {model_dir} as lexjax.models.{conversion.model}")
    return text
