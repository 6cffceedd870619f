"""lexjax: a JAX/Flax model zoo for long-context language models and length-extrapolating
position encodings.

Entry points: `build_model(gin_files, bindings)` returns the configured flax module; the CLIs
`python -m lexjax.train / evaluate / bench` run it.
"""
from lexjax.config import ConfigError, build_model

__all__ = ["build_model", "ConfigError"]
__version__ = "0.1.0"
