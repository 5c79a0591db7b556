"""Which backend the e2e servers run on, and what the test process can import.

The servers inherit TAPSERVE_BACKEND from the environment (the whole suite runs on JAX
with `TAPSERVE_BACKEND=jax`); the test process's Keras follows it (tests/conftest.py).
A venv with `.[jax,test]` has no TensorFlow: no SavedModels or string lookups can be
built there, and no stock TF Serving client (tensorflow-serving-api imports tensorflow)."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest

BACKEND = os.environ.get("TAPSERVE_BACKEND", "tensorflow")
HAS_TF = importlib.util.find_spec("tensorflow") is not None
HAS_TFS_CLIENT = HAS_TF and importlib.util.find_spec("tensorflow_serving") is not None

# Deselected by the JAX run (`-m "not frontend_only"`): what these tests check does not depend
# on the backend (transport, limits, security, drain, tracing, storage, docs, deploy).
frontend_only = pytest.mark.frontend_only
needs_tf = pytest.mark.skipif(not HAS_TF, reason="needs tensorflow in the test process")
needs_tfs_client = pytest.mark.skipif(
    not HAS_TFS_CLIENT,
    reason="the stock TF Serving client (tensorflow-serving-api) needs tensorflow")
# A SavedModel or a string lookup: the jax backend refuses them at load (tested where
# the refusal is the point: test_serving, test_backends).
tf_models = pytest.mark.skipif(
    BACKEND != "tensorflow" or not HAS_TF,
    reason="a TensorFlow-only model (SavedModel, string lookup): needs the tensorflow "
           "backend and tensorflow in the test process")

# Built once on TensorFlow and kept (a venv without it cannot build them): a .keras model
# with a StringLookup (zoo.build_string_input) and a SavedModel ("x" (n, 4) -> "y" = 2x).
TF_ONLY = Path(__file__).parent / "data" / "tf_only"


def copy_tf_only_models(repository: Path) -> list[str]:
    """Both TensorFlow-only models into `repository`; their names."""
    for model in TF_ONLY.iterdir():
        shutil.copytree(model, repository / model.name)
    return sorted(m.name for m in TF_ONLY.iterdir())
