"""Small helpers the test modules share: a tiny text corpus on disk, and decoding a whole
sequence through the models' incremental-decoding interface."""
from __future__ import annotations

import importlib.util
import os
import random
import sys

import jax
import jax.numpy as jnp


def write_corpus(root, *, min_per_split=2, train_files=24, words=300, seed=0) -> str:
    """Plain-text files under `root`, named so that every split gets files (splits are decided
    by a hash of the name, see lexjax.data.corpora.split_of). Returns the glob."""
    from lexjax.data import split_of

    vocab = ["def", "return", "class", "import", "self", "for", "in", "if", "else", "x", "y",
             "print", "(", ")", ":", "=", "+", "\n", "lambda", "yield"]
    rng = random.Random(seed)
    os.makedirs(root, exist_ok=True)
    counts = {"train": 0, "validation": 0, "test": 0}
    i = 0
    while counts["train"] < train_files or min(counts.values()) < min_per_split:
        name = f"doc{i:04d}.txt"
        i += 1
        split = split_of(name)
        if split == "train" and counts["train"] >= train_files:
            continue
        counts[split] += 1
        with open(os.path.join(root, name), "w") as f:
            f.write(" ".join(rng.choice(vocab) for _ in range(words)))
    return os.path.join(root, "*.txt")


def decode_all(model, variables, tokens, prompt: int, max_length: int):
    """`(logits [b, n, vocab], cache)`: `tokens [b, n]` read as a prompt of `prompt` tokens
    (`prefill`) and then one token at a time (`decode_step`, jitted). For models with logits at
    every position, equal to the forward pass on `tokens`."""
    logits, cache = model.prefill(variables, tokens[:, :prompt], max_length=max_length)
    outs, step = [logits], jax.jit(model.decode_step)
    for t in range(prompt, tokens.shape[1]):
        out, cache = step(variables, cache, tokens[:, t])
        outs.append(out[:, None])
    return jnp.concatenate(outs, axis=1), cache


def step_through(layer, variables, x, step_method):
    """`[b, n, ...]`: a recurrent layer's `step_method(x_t, state)` run over the length axis of
    `x [b, n, ...]` from `layer.initial_state(b)` (to compare with its sequence form)."""
    step = jax.jit(lambda v, xt, s: layer.apply(v, xt, s, method=step_method))
    state, outs = layer.initial_state(x.shape[0]), []
    for t in range(x.shape[1]):
        y, state = step(variables, x[:, t], state)
        outs.append(y)
    return jnp.stack(outs, axis=1)


def projection_flops(params) -> float:
    """2 FLOPs per weight of every projection kernel: a model's per-token matmul cost outside
    attention scores (an independent count of `flops_per_token`'s projection terms)."""
    import flax.linen as nn

    leaves = jax.tree_util.tree_flatten_with_path(nn.unbox(params))[0]
    return sum(2.0 * leaf.size for path, leaf in leaves
               if jax.tree_util.keystr(path).endswith("['kernel']"))


def study_runner(script: str):
    """`experiments/<script>.py` (not a package) imported once per process as
    `<script>_study`: it registers its study configurable with gin, which refuses a second
    registration under another module name."""
    name = f"{script}_study"
    if name not in sys.modules:
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        spec = importlib.util.spec_from_file_location(
            name, os.path.join(repo, "experiments", f"{script}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # its dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules[name]

