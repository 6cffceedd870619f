"""Checkpoints with orbax: parameters, optimizer state and a small JSON record per step.

Orbax writes each step into a temporary directory and renames it when complete, so a process
killed at any moment leaves the previous complete checkpoint as the latest one. Parameters are a
separate item, so `lexjax.load` and fine-tuning (`--init_from`) read them without the optimizer.
A step whose files were damaged afterwards (a truncated file, a full disk) can be `set_aside`:
renamed `<step>.unreadable` for inspection, so the step before it becomes the latest.
"""
from __future__ import annotations

import glob
import os
import shutil
import time
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from lexjax.errors import UserError


TEMPORARY_MARK = ".orbax-checkpoint-tmp"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is missing, unreadable, or belongs to another model."""


def checkpoint_dir(model_dir: str) -> str:
    return os.path.join(os.path.abspath(model_dir), "checkpoints")


def remove_unfinished_saves(directory: str) -> None:
    """Deletes the temporary directories of saves a killed process left unfinished (orbax names
    them `<step>.orbax-checkpoint-tmp-*`; they are never read as checkpoints)."""
    for path in glob.glob(os.path.join(directory, f"*{TEMPORARY_MARK}*")):
        shutil.rmtree(path, ignore_errors=True)


def _one_device() -> jax.sharding.Sharding:
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


class Checkpointer:
    """Saves and restores `(params, opt_state, meta)`, and the carry of a state-carrying model,
    under `model_dir/checkpoints/<step>`."""

    def __init__(self, model_dir: str, *, max_to_keep: int = 3, read_only: bool = False):
        self.directory = checkpoint_dir(model_dir)
        if read_only and not os.path.isdir(self.directory):
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
        source = os.path.join(self.directory, str(step))
        target = source + ".unreadable"
        if os.path.exists(target):
            target += f".{int(time.time())}"
        os.replace(source, target)
        self.manager.reload()
        return target

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
                f"cannot read checkpoint {os.path.join(self.directory, str(step))}: "
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
