"""Shared test setup: 8 fake CPU devices (for sharding tests), TPU ahead-of-time compilation on
this CPU host, and quiet TF/XLA logging.

pytest imports this module before any test module, so the environment variables below are set
before jax is first imported (and before libtpu is loaded).

`--xla_backend_optimization_level=0` skips LLVM's optimization passes: the tests compile many
tiny programs, and at these sizes compile time dominates (it cuts the suite's CPU time by about
40%); results are unchanged up to float rounding. Set the flag yourself to override it.

TPU ahead-of-time tests describe a TPU topology with libtpu (a test dependency) and compile for it
without a TPU:
- `JAX_PLATFORMS=cpu`: jax computes on the CPU. Without it, every process in which libtpu is
  installed tries to start a TPU backend, logs a failure, and takes libtpu's host-wide lock
  (`/tmp/libtpu_lockfile`). Describing a topology (`get_topology_desc`) does not need the TPU
  backend and works under `JAX_PLATFORMS=cpu`.
- `ALLOW_MULTIPLE_LIBTPU_LOAD=1`: describing a topology loads libtpu, which takes the same lock for
  the life of the process; without this, a second process doing so (another pytest-xdist worker,
  or any other JAX process on the host) fails with "Internal error when accessing libtpu
  multi-process lockfile". Compiling ahead of time never claims a TPU, so sharing is safe.
Either variable set beforehand is kept.
"""
import os

_flags = os.environ.get("XLA_FLAGS", "")
if "--xla_force_host_platform_device_count" not in _flags:
    _flags += " --xla_force_host_platform_device_count=8"
if "--xla_backend_optimization_level" not in _flags:
    _flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = _flags.strip()
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def rng():
    """A fresh, seeded numpy generator per test."""
    return np.random.default_rng(0)


@pytest.fixture(scope="module")
def isolated_data_cache(tmp_path_factory):
    """Token streams cached under a temporary directory for a module's tests (via
    $LEXJAX_DATA_CACHE, `lexjax.data.CACHE_ENV`), so mock or toy corpora never reach a real
    cache."""
    cache = str(tmp_path_factory.mktemp("data_cache"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LEXJAX_DATA_CACHE", cache)
        yield cache
