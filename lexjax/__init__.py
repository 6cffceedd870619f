"""lexjax: a JAX/Flax model zoo for long-context language models and length-extrapolating
position encodings.

Entry points: `build_model(gin_files, bindings)` returns the configured flax module;
`load(model_dir)` a trained run's `(model, variables)`; `from_hf(directory)` a Hugging Face
checkpoint's, as one of the zoo's models; `generate(model, variables, prompt,
max_new_tokens, ...)` continues prompts; the CLIs `python -m lexjax.train / evaluate / generate /
bench / convert` run them.

`import lexjax` itself is light (JAX and Flax load on first use of an entry point), so the CLIs
check their arguments and the run directory before paying for those imports.
"""
import importlib
import importlib.util

from lexjax import _platforms

_platforms.configure()  # before anything starts a JAX backend

from lexjax.errors import ConfigError  # noqa: E402

_LAZY = {"build_model": "lexjax.config", "generate": "lexjax.generation",
         "from_hf": "lexjax.convert"}


def __getattr__(name: str):
    """`build_model` and `generate`, and the subpackages (`lexjax.models`, ...), imported on
    first use."""
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif importlib.util.find_spec(f"lexjax.{name}") is not None:
        value = importlib.import_module(f"lexjax.{name}")
    else:
        raise AttributeError(f"module 'lexjax' has no attribute {name!r}")
    globals()[name] = value
    return value


def load(model_dir: str, step: int | None = None, bindings: tuple[str, ...] = ()):
    """`(model, variables)` of a trained run in `model_dir`, a local path or a URI
    (`gs://bucket/run`), at its latest checkpoint unless `step`; `bindings` adjust the rebuilt
    model, e.g. `("BCA_BLOCK=64",)` with a BCA config. See `lexjax.runs.load_run` for the run's
    config and checkpoint record as well."""
    from lexjax.runs import load_run
    run = load_run(model_dir, step, bindings=bindings)
    return run.model, run.variables


__all__ = ["build_model", "load", "generate", "from_hf", "ConfigError"]
__version__ = "0.1.0"
