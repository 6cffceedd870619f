"""Golden parameter layouts (flaxformer style): the shape and logical axis names of every
parameter of every model config at tiny sizes, stored as JSON under
`tests/testdata/param_layouts/<config>.json`. A refactor that changes a checkpoint's layout (a
renamed module, a transposed kernel, a lost axis name) fails `tests/test_lm_contract.py` loudly.

After an intended layout change, regenerate with

    .venv/bin/python tests/param_layouts.py

and say so in the commit: checkpoints written before it no longer load.
"""
from __future__ import annotations

import glob
import json
import os
import sys

import flax.linen as nn
import jax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN_DIR = os.path.join(REPO, "tests", "testdata", "param_layouts")
# Tiny sizes: every size macro a model config honours, small enough to build
# each model in well under a second.
TINY = ("NUM_LAYERS=2", "EMBED_DIM=32", "NUM_HEADS=4", "MLP_DIM=64", "VOCAB_SIZE=64",
        "CHUNK_SIZE=8", "NUM_LATENTS=8")
INIT_LENGTH = 16


def model_configs() -> list[str]:
    """Names of `configs/models/*.gin`."""
    return sorted(os.path.splitext(os.path.basename(p))[0]
                  for p in glob.glob(os.path.join(REPO, "configs", "models", "*.gin")))


def causal_model_configs() -> list[str]:
    """The model configs that are causal LMs (decoding, next-token loss): all but encoders."""
    return [c for c in model_configs() if not build(c).bidirectional]


def layout(model: nn.Module) -> dict:
    """`{"model": class name, "params": {path: {"shape", "axes"}}}` of a model's parameters."""
    from lexjax.training.state import example_inputs  # a ViT's images, else int32 tokens
    inputs = example_inputs(model, 2, INIT_LENGTH)
    boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), inputs)["params"]
    leaves = jax.tree_util.tree_flatten_with_path(
        boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
    params = {}
    for path, leaf in leaves:
        names = list(leaf.names) if isinstance(leaf, nn.Partitioned) else None
        value = leaf.value if isinstance(leaf, nn.Partitioned) else leaf
        key = "/".join(str(getattr(p, "key", p)) for p in path)
        params[key] = {"shape": list(value.shape), "dtype": str(value.dtype), "axes": names}
    return {"model": type(model).__name__, "params": dict(sorted(params.items()))}


def to_json(record: dict) -> str:
    """The layout as JSON with one parameter per line (diffs read well)."""
    rows = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in record["params"].items()]
    return ('{\n "model": ' + json.dumps(record["model"]) + ',\n "params": {\n'
            + ",\n".join(rows) + "\n }\n}\n")


def golden_path(config: str) -> str:
    return os.path.join(GOLDEN_DIR, f"{config}.json")


def build(config: str) -> nn.Module:
    import lexjax
    return lexjax.build_model([f"configs/models/{config}.gin"], TINY)


def main() -> int:
    os.makedirs(GOLDEN_DIR, exist_ok=True)
    for config in model_configs():
        with open(golden_path(config), "w") as f:
            f.write(to_json(layout(build(config))))
        print(f"wrote {golden_path(config)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    sys.exit(main())
