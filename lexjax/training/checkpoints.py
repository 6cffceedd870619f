"""Checkpoints with orbax: parameters, optimizer state and a small JSON record per step.

Orbax writes each step into a temporary directory and renames it when complete, so a process
killed at any moment leaves the previous complete checkpoint as the latest one. Parameters are a
separate item, so `lexjax.load` and fine-tuning (`--init_from`) read them without the optimizer.
A step whose files were damaged afterwards (a truncated file, a full disk) can be `set_aside`:
renamed `<step>.unreadable` for inspection, so the step before it becomes the latest.
`model_dir` may be a URI (`gs://bucket/run`): orbax and the paths here go through `etils.epath`.
"""
from __future__ import annotations

import time
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from etils import epath

from lexjax.errors import UserError
from lexjax.paths import run_path


TEMPORARY_MARK = ".orbax-checkpoint-tmp"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is missing, unreadable, or belongs to another model."""


def checkpoint_dir(model_dir: str) -> str:
    """`model_dir/checkpoints`: absolute for a local `model_dir`, a URI (`gs://...`) as given."""
    return str(run_path(model_dir) / "checkpoints")


def remove_unfinished_saves(directory: str) -> None:
    """Deletes the temporary directories of saves a killed process left unfinished (orbax names
    them `<step>.orbax-checkpoint-tmp-*`; they are never read as checkpoints)."""
    for path in epath.Path(directory).glob(f"*{TEMPORARY_MARK}*"):
        try:
            path.rmtree()
        except OSError:
            pass  # gone already, or not ours to delete: never read as a checkpoint either way


def _one_device() -> jax.sharding.Sharding:
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


class Checkpointer:
    """Saves and restores `(params, opt_state, meta)`, and the carry of a state-carrying model,
    under `model_dir/checkpoints/<step>`."""

    def __init__(self, model_dir: str, *, max_to_keep: int = 3, read_only: bool = False):
        self.directory = checkpoint_dir(model_dir)
        if read_only and not epath.Path(self.directory).is_dir():
            raise CheckpointError(f"no checkpoints in {model_dir!r} (expected "
                                  f"{self.directory}); train there first with python -m lexjax.train")
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, create=not read_only, read_only=read_only))
        if not read_only and jax.process_index() == 0:
            remove_unfinished_saves(self.directory)

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def set_aside(self, step: int) -> str:
        """Renames step `step`'s directory to `<step>.unreadable` (kept for inspection, no longer
        a checkpoint) and returns the new path."""
        source = epath.Path(self.directory) / str(step)
        target = source.with_name(f"{step}.unreadable")
        if target.exists():
            target = target.with_name(f"{target.name}.{int(time.time())}")
        source.replace(target)
        self.manager.reload()
        return str(target)

    def save(self, step: int, params: Any, opt_state: Any, meta: dict,
             carry: Any = None) -> None:
        """Starts an asynchronous save; `wait()` before relying on it. `carry`: the train state's
        carry of a state-carrying model (restored by `restore_carry`), saved in the same step."""
        items = dict(params=ocp.args.StandardSave(params),
                     opt_state=ocp.args.StandardSave(opt_state), meta=ocp.args.JsonSave(meta))
        if carry is not None:
            items["carry"] = ocp.args.StandardSave(carry)
        self.manager.save(step, args=ocp.args.Composite(**items))

    def save_params(self, step: int, params: Any, meta: dict) -> None:
        """Saves parameters and `meta` alone (no optimizer state: a converted checkpoint, which
        runs fine-tune with `--init_from`); `wait()` before relying on it."""
        self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(meta)))

    def _step(self, step: Optional[int]) -> int:
        step = self.latest_step() if step is None else step
        if step is None or step not in self.manager.all_steps():
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory} "
                                  f"(have {list(self.manager.all_steps())})")
        return step

    def _restore(self, step: int, **items) -> Any:
        try:
            return self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # orbax raises many types for damaged or foreign data
            first_line = (str(e).splitlines() or [""])[0][:300]
            raise CheckpointError(
                f"cannot read checkpoint {epath.Path(self.directory) / str(step)}: "
                f"{type(e).__name__}: {first_line} (its files are damaged, or hold another "
                "model's parameters)") from None

    def meta(self, step: Optional[int] = None) -> dict:
        step = self._step(step)
        return dict(self._restore(step, meta=ocp.args.JsonRestore())["meta"])

    def restore_params(self, abstract_params: Any, step: Optional[int] = None) -> Any:
        """Parameters only, shaped (and sharded) like `abstract_params` (ShapeDtypeStructs), or
        as saved (host arrays) when `abstract_params` is None."""
        step = self._step(step)
        if abstract_params is None:
            item = self.manager.item_metadata(step)["params"]
            abstract_params = jax.tree_util.tree_map(
                lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=_one_device()), item)
        return self._restore(step, params=ocp.args.StandardRestore(abstract_params))["params"]

    def restore(self, abstract_params: Any, abstract_opt_state: Any,
                step: Optional[int] = None) -> tuple[Any, Any, dict]:
        step = self._step(step)
        out = self._restore(step, params=ocp.args.StandardRestore(abstract_params),
                            opt_state=ocp.args.StandardRestore(abstract_opt_state),
                            meta=ocp.args.JsonRestore())
        return out["params"], out["opt_state"], dict(out["meta"])

    def restore_carry(self, abstract_carry: Any, step: Optional[int] = None) -> Any:
        """The carry saved with step `step` (default: latest), shaped like `abstract_carry`."""
        step = self._step(step)
        return self._restore(step, carry=ocp.args.StandardRestore(abstract_carry))["carry"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
