"""Run directories: what `python -m lexjax.train --model_dir=D` leaves in D, read back.

`load_run(D)` rebuilds the model and the run's `TrainConfig` from `D/config.gin`, restores the
parameters of a checkpoint onto a mesh, and returns them together (`Run`). Run directories
written before `TrainConfig` existed (their config.gin binds `train.task`, `make_optimizer.*` and
`configured_model.model`) are read through `upgrade_legacy_config`; their parameter layout is
unchanged, so their checkpoints load. Gin's global config is cleared afterwards, as
`lexjax.build_model` does. D may be a URI (`gs://bucket/run`, through `etils.epath`).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Optional, Sequence

import flax.linen as nn
import gin
import jax

from lexjax import partitioning
from lexjax.config import configured_value, parse_gin
from lexjax.paths import run_path
from lexjax.training.checkpoints import CheckpointError, Checkpointer
from lexjax.training.config import TrainConfig
from lexjax.training.state import example_inputs, params_fingerprint

CONFIG_FILE = "config.gin"


@dataclasses.dataclass(frozen=True)
class Run:
    """A trained run, read back.

    Attributes:
      model: the LM, as configured (plus any gin files and bindings given to `load_run`).
      variables: `{"params": ...}` of the checkpoint, on the mesh it was restored to.
      config: the run's `TrainConfig` (its `data` says what the run read).
      meta: the checkpoint's record: model, fingerprint, train_length, task, objective, step.
    """

    model: nn.Module
    variables: dict
    config: TrainConfig
    meta: dict

    @property
    def step(self) -> Optional[int]:
        return self.meta.get("step")

    @property
    def train_length(self) -> int:
        return self.config.train_length


# Pre-TrainConfig bindings (short or full names) -> where they live now ("" drops the line).
_LEGACY_RENAMES = (
    (r"(?:lexjax\.training\.)?make_optimizer\.total_steps\b", ""),  # now TRAIN_STEPS
    (r"(?:lexjax\.training\.)?train\.task\b", "lexjax.data.DataConfig.task"),
    (r"(?:lexjax\.training\.)?train\.(\w+)\b", r"lexjax.training.TrainConfig.\1"),
    (r"(?:lexjax\.training\.)?make_optimizer\.(\w+)\b", r"lexjax.training.OptimizerConfig.\1"),
    (r"(?:lexjax\.data\.)?text_files_glob\.pattern\b", "lexjax.data.DataConfig.text_files_glob"),
    (r"(?:lexjax\.data\.)?vocabulary\.kind\b", "lexjax.data.DataConfig.vocabulary"),
    (r"(?:lexjax\.data\.)?vocabulary\.sentencepiece_model\b",
     "lexjax.data.DataConfig.sentencepiece_model"),
    (r"(?:lexjax\.data\.)?stdlib_corpus\.include_test_suites\b",
     "lexjax.data.DataConfig.include_test_suites"),
)
_LEGACY_MARK = re.compile(r"^(?:lexjax\.)?configured_model\.model = (.*)$", re.MULTILINE)
_NEW_BINDINGS = """
lexjax.training.train.model = {model}
lexjax.training.train.config = @lexjax.training.TrainConfig()
lexjax.training.TrainConfig.data = @lexjax.data.DataConfig()
lexjax.training.TrainConfig.optimizer = @lexjax.training.OptimizerConfig()
"""


def is_legacy_config(text: str) -> bool:
    """Whether a config.gin predates `TrainConfig` (it binds `configured_model.model`)."""
    return bool(_LEGACY_MARK.search(text))


def upgrade_legacy_config(text: str) -> str:
    """A pre-`TrainConfig` config.gin rewritten to bind the same values where they live now."""
    model = _LEGACY_MARK.search(text).group(1)
    lines = []
    for line in _LEGACY_MARK.sub("", text).splitlines():
        for pattern, replacement in _LEGACY_RENAMES:
            if re.match(pattern, line):
                line = re.sub("^" + pattern, replacement, line) if replacement else ""
                break
        lines.append(line)
    return "\n".join(lines) + _NEW_BINDINGS.format(model=model)


def read_config(model_dir: str) -> str:
    """The text of `model_dir/config.gin` (upgraded if it predates TrainConfig)."""
    path = run_path(model_dir) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{model_dir!r} has no {CONFIG_FILE}: not a lexjax run directory "
                              "(train one with python -m lexjax.train --model_dir=...)")
    text = path.read_text()
    return upgrade_legacy_config(text) if is_legacy_config(text) else text


def configured_run(model_dir: str, gin_files: Sequence[str] = (), bindings: Sequence[str] = ()
                   ) -> tuple[nn.Module, TrainConfig]:
    """The model and `TrainConfig` a run directory's config.gin binds (plus `gin_files` and
    `bindings` on top, e.g. configs/features/bca.gin). Gin's global config is cleared before and
    after, as `lexjax.build_model` does."""
    import lexjax.data  # noqa: F401  (registers DataConfig, which every run config binds)

    parse_gin(bindings=[read_config(model_dir)])
    try:
        parse_gin(gin_files, bindings, clear=False)
        return configured_training()
    finally:
        gin.clear_config()


def configured_training() -> tuple[nn.Module, TrainConfig]:
    """The model and `TrainConfig` the parsed gin config hands `lexjax.training.train` (what a
    run gin binds): the objects the trainer, the bench and `load_run` all read."""
    fix = "pass a run gin such as configs/runs/quickstart.gin"
    model = configured_value("lexjax.training.train.model", "model to train", fix)
    config = configured_value("lexjax.training.train.config", "TrainConfig", fix)
    return model, config


def load_run(model_dir: str, step: Optional[int] = None, *, gin_files: Sequence[str] = (),
             bindings: Sequence[str] = (), mesh=None) -> Run:
    """The run in `model_dir`: its model and config rebuilt from config.gin (plus `gin_files`
    and `bindings`), and the parameters of the checkpoint at `step` (default: latest) restored
    onto `mesh` (default: one device), sharded there by the run's logical-axis rules whatever
    mesh saved them. A checkpoint of another parameter layout is refused in one line."""
    checkpointer = Checkpointer(model_dir, read_only=True)
    meta = checkpointer.meta(step)
    model, config = configured_run(model_dir, gin_files, bindings)
    mesh = mesh or partitioning.make_mesh("", jax.devices()[:1])
    boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                           example_inputs(model, 1, 8))["params"]
    abstract = partitioning.sharded_abstract(boxed, mesh, config.logical_axis_rules)
    expected = params_fingerprint(abstract)
    if meta.get("fingerprint") not in (None, expected):
        raise CheckpointError(
            f"the checkpoint in {model_dir!r} holds {meta.get('model')} parameters of layout "
            f"{meta.get('fingerprint')}, but its config builds layout {expected}: the model's "
            "parameter layout changed since it was written (see tests/testdata/param_layouts); "
            "load it with the lexjax version that wrote it, or retrain")
    params = checkpointer.restore_params(abstract, step)
    return Run(model=model, variables={"params": params}, config=config, meta=meta)

