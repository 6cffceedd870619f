"""Imports TensorFlow for the data pipeline only: quietly, and without letting it touch GPUs.

TensorFlow here only reads files and tokenizes text; the accelerators belong to JAX. Two
TensorFlow-only settings, each a default that an explicit environment variable overrides:

* `TF_ENABLED_DEVICE_TYPES=CPU`: TensorFlow registers CPU devices only, so it neither probes CUDA
  (which logs "failed call to cuInit" on machines without a GPU) nor reserves accelerator memory.
  `tf.config.set_visible_devices([], "GPU")` hides GPUs as well when the variable is overridden.
* `TF_CPP_MIN_LOG_LEVEL=2`: TensorFlow's C++ info and warnings are hidden, errors still show.

The few lines TensorFlow's C++ runtime prints while loading, before its logging is initialised
("oneDNN custom operations are on", "Could not find cuda drivers"), ignore both variables and
cannot be silenced without redirecting the process's stderr, which a library should not do.
"""
from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLED_DEVICE_TYPES", "CPU")

import tensorflow as tf  # noqa: E402  (must follow the environment defaults above)


def _hide_accelerators_from_tf() -> None:
    try:
        tf.config.set_visible_devices([], "GPU")
    except (RuntimeError, ValueError):
        # TensorFlow's runtime was already initialised by an earlier import; nothing to undo.
        pass


_hide_accelerators_from_tf()
