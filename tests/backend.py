"""The suite's Keras backend (TAPSERVE_BACKEND, set by conftest.py before keras is imported)
and the marks for tests that need one backend."""

from __future__ import annotations

import os

import pytest

BACKEND = os.environ.get("TAPSERVE_BACKEND", "tensorflow")
JAX = BACKEND == "jax"

# Tests of TensorFlow itself (SavedModels, string tensors, tf.function's traces and XLA
# flags): they have no meaning on jax, whose own behaviour tests/test_runtime_jax.py tests.
needs_tensorflow = pytest.mark.skipif(JAX, reason="TensorFlow-only: runs with "
                                      "TAPSERVE_BACKEND=tensorflow")
needs_jax = pytest.mark.skipif(not JAX, reason="the jax runtime: runs with TAPSERVE_BACKEND=jax")
