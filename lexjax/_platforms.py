"""Which JAX backends a process starts, decided before JAX starts any.

`libtpu` is a test dependency: it lets any machine compile for a Cloud TPU topology ahead of time
(`jax.experimental.topologies`, no TPU needed). Installed on a host without TPU chips, it would
make every JAX process try to start a TPU backend, log errors, and hold libtpu's lock file
(so a second process compiling for a topology fails). On such a host, unless the user chose
`JAX_PLATFORMS`, lexjax starts only the local backends (CPU, and CUDA where NVIDIA devices exist)
and lets processes share libtpu for ahead-of-time compilation (`ALLOW_MULTIPLE_LIBTPU_LOAD`).
"""
from __future__ import annotations

import glob
import importlib.util
import os
import sys

TPU_DEVICE_FILES = ("/dev/accel*", "/dev/vfio/[0-9]*")  # TPU VMs (v2-v5e; v5p/v6e)


def has_tpu_chips() -> bool:
    return any(glob.glob(pattern) for pattern in TPU_DEVICE_FILES)


CUDA_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin")


def local_platforms() -> str:
    """The `JAX_PLATFORMS` value for a host without TPU chips: CUDA too where NVIDIA devices and
    a JAX CUDA plugin exist."""
    cuda = (glob.glob("/dev/nvidia[0-9]*")
            and any(importlib.util.find_spec(name) for name in CUDA_PLUGINS))
    return "cuda,cpu" if cuda else "cpu"


def configure(environ: dict = os.environ) -> None:
    """Sets `JAX_PLATFORMS` and `ALLOW_MULTIPLE_LIBTPU_LOAD` (unless set) when libtpu is
    installed on a host without TPU chips; changes nothing otherwise."""
    if has_tpu_chips() or importlib.util.find_spec("libtpu") is None:
        return
    if "JAX_PLATFORMS" not in environ:
        environ["JAX_PLATFORMS"] = local_platforms()
        if "jax" in sys.modules:  # imported first: its flag already read the environment
            sys.modules["jax"].config.update("jax_platforms", environ["JAX_PLATFORMS"])
    environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
