"""Shared test setup: 8 fake CPU devices (for sharding tests) and quiet TF/XLA logging.

pytest imports this module before any test module, so the environment variables below are set
before jax is first imported.

`--xla_backend_optimization_level=0` skips LLVM's optimization passes: the tests compile many
tiny programs, and at these sizes compile time dominates (it cuts the suite's CPU time by about
40%); results are unchanged up to float rounding. Set the flag yourself to override it.
"""
import os

_flags = os.environ.get("XLA_FLAGS", "")
if "--xla_force_host_platform_device_count" not in _flags:
    _flags += " --xla_force_host_platform_device_count=8"
if "--xla_backend_optimization_level" not in _flags:
    _flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = _flags.strip()
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def rng():
    """A fresh, seeded numpy generator per test."""
    return np.random.default_rng(0)
