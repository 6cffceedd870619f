"""Gin configuration: parsing with clear errors, and reading the objects a config binds.

Gin binds the objects handed to the top-level entry points (the model, its position scheme, its
masks, the run's `TrainConfig`) at the moment they are constructed; no internal module reads gin
at apply time, so a model returned by `build_model` does not change when gin's global config
changes later. Every model gin sets the macro `MODEL`; every run gin binds
`lexjax.training.train.model = %MODEL` and `lexjax.training.train.config`, which the trainer,
the bench and `lexjax.load` read.

Gin files are looked up relative to the working directory first, then relative to the repository
root (the folder that holds `configs/`), so `configs/models/transformer.gin` works from anywhere.
"""
from __future__ import annotations

import contextlib
import difflib
import logging
import os
import re
from typing import Any, Iterable, Sequence

import flax.linen as nn
import gin

from lexjax.errors import ConfigError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

__all__ = ["ConfigError", "REPO_ROOT", "build_model", "check_bindings_used", "configured_model",
           "configured_value", "parse_gin", "unset_required_macros"]


def _resolve_gin_file(path: str) -> str:
    for candidate in (path, os.path.join(REPO_ROOT, path)):
        if os.path.isfile(candidate):
            return candidate
    raise ConfigError(
        f"gin file not found: {path!r} (looked in {os.getcwd()!r} and {REPO_ROOT!r}); "
        "pass an existing file with --gin_file, e.g. configs/models/transformer.gin")


def _import_configurables() -> None:
    """Registers the gin configurables of the package that import no TensorFlow (models,
    positions, masks, training); run gins `import lexjax.data` for the data configurables."""
    import lexjax.attention  # noqa: F401
    import lexjax.models  # noqa: F401
    import lexjax.positions  # noqa: F401
    import lexjax.training  # noqa: F401


def parse_gin(gin_files: Sequence[str] = (), bindings: Iterable[str] = (), *,
              clear: bool = True) -> None:
    """Parses gin files then bindings (later ones win), raising `ConfigError` on any problem.

    Args:
      gin_files: paths of gin files, applied in order.
      bindings: gin binding strings such as `"NUM_LAYERS=2"` or `"Transformer.dropout_rate=0.1"`.
      clear: start from an empty gin config (default), so earlier calls leave nothing behind.
    """
    _import_configurables()
    if clear:
        gin.clear_config()
    gin.add_config_file_search_path(REPO_ROOT)
    files = [_resolve_gin_file(f) for f in gin_files]
    try:
        with _quiet_include_probes():
            gin.parse_config_files_and_bindings(files, list(bindings), finalize_config=False)
    except (ValueError, KeyError, SyntaxError, ImportError, IOError) as e:
        gin.clear_config()
        raise ConfigError(f"bad gin config: {_first_line(e)}; check the names against "
                          "configs/ and the gin files you passed (see WORKSPACE.md)") from None
    missing = unset_required_macros()
    if missing:
        gin.clear_config()
        raise ConfigError(
            f"{', '.join(missing)} must be set: a gin file you passed marks "
            f"{'it' if len(missing) == 1 else 'them'} %gin.REQUIRED; add "
            + " ".join(f"--gin.{name}=VALUE" for name in missing))


class _DropIncludeProbes(logging.Filter):
    """Drops gin's "Path not found" ERROR records: gin tries each include as a path on the Python
    path before its search path (which finds it), and logs the miss at ERROR level."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.module == "resource_reader"
                    and str(record.msg).startswith("Path not found"))


@contextlib.contextmanager
def _quiet_include_probes():
    probes = _DropIncludeProbes()
    logging.getLogger().addFilter(probes)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(probes)


_REQUIRED_MACRO = re.compile(r"^(\w+) = %gin\.REQUIRED$", re.MULTILINE)


def unset_required_macros() -> list[str]:
    """Macros of the parsed config still bound to `%gin.REQUIRED` (e.g. configs/features/bca.gin's
    BCA_BLOCK), which gin would otherwise pass on as an opaque sentinel object."""
    return _REQUIRED_MACRO.findall(gin.config_str())


_MACRO_REFERENCE = re.compile(r"%([A-Za-z_]\w*)")


def model_macros() -> set[str]:
    """The macros the model, position and feature gins read (CHUNK_SIZE, NUM_LATENTS, ...): one
    set of size macros serves every model, so a model may ignore some of them."""
    names = set()
    for kind in ("models", "positions", "features"):
        directory = os.path.join(REPO_ROOT, "configs", kind)
        for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else ():
            with open(os.path.join(directory, name)) as f:
                names.update(_MACRO_REFERENCE.findall(f.read()))
    return names


def check_bindings_used(bindings: Iterable[str]) -> None:
    """A `ConfigError` for a binding that sets a macro nothing in the parsed config reads (a
    misspelt `--gin.TRAIN_STEP=5` would otherwise be ignored), naming the closest macro. The
    models' size macros (`model_macros`) may go unread."""
    referenced = set(_MACRO_REFERENCE.findall(gin.config_str()))
    allowed = referenced | model_macros()
    for binding in bindings:
        name = binding.split("=", 1)[0].strip()
        if "." in name or "/" in name or name in allowed:
            continue
        close = difflib.get_close_matches(name, sorted(referenced), n=1)
        hint = f"did you mean {close[0]}?" if close else "check the name against the gin files"
        raise ConfigError(f"--gin.{name} sets a macro that nothing in the config reads; {hint}")


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


def configured_value(name: str, what: str, fix: str) -> Any:
    """The value the parsed gin config gives `name` — a macro (`"%MODEL"`) or a parameter
    (`"lexjax.training.train.config"`) — with any `@configurable()` reference constructed now.
    `ConfigError` if it is unbound (naming `what` is missing, and the `fix`) or cannot be
    built."""
    try:
        value = gin.query_parameter(name)
    except ValueError:
        raise ConfigError(f"no {what}: the gin files bind no {name.lstrip('%')}; {fix}") from None
    if isinstance(value, gin.config.ConfigurableReference):
        try:
            value = value.scoped_configurable_fn()
        except (ValueError, TypeError, RuntimeError) as e:
            raise ConfigError(f"cannot build the {what}: {_first_line(e)}") from None
    return value


def configured_model() -> nn.Module:
    """Constructs `%MODEL` (set by every configs/models/<name>.gin) from the parsed config."""
    return configured_value("%MODEL", "model",
                            "pass a model gin (configs/models/<name>.gin sets MODEL and its size "
                            "macros)")


def build_model(gin_files: Sequence[str] = (), bindings: Iterable[str] = ()) -> nn.Module:
    """Returns the language model described by gin files and bindings.

    Example: `build_model(["configs/models/transformer.gin", "configs/positions/alibi.gin"],
    ["NUM_LAYERS=2"])`. Gin's global config is cleared before and after, so successive calls are
    independent. Every model maps int32 tokens `[batch, length]` to logits
    `[batch, length, vocab]` and is causal.
    """
    parse_gin(gin_files, bindings)
    try:
        return configured_model()
    finally:
        gin.clear_config()
