"""Picking the backend (service/backends.py): before keras is imported, once a process."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import keras
import pytest
from backend import BACKEND

from service import backends
from service.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_the_cli_imports_no_backend_before_reading_its_settings() -> None:
    code = ("import sys, service.cli; "
            "print(sorted(m for m in ('keras', 'tensorflow', 'jax') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "[]"


def test_keras_on_another_backend_refuses_a_second_server() -> None:
    other = "jax" if BACKEND == "tensorflow" else "tensorflow"
    if importlib.util.find_spec(other) is None:
        pytest.skip(f"{other} is not installed: select says so first")
    assert keras.backend.backend() == BACKEND
    with pytest.raises(ConfigError, match=f"keras is already imported on the {BACKEND} "
                                          f"backend.*a server on {other} needs a process"):
        backends.select(other)
    backends.select(BACKEND)  # the same backend: fine


def test_a_missing_backend_package_says_what_to_install(monkeypatch) -> None:
    # Both packages are installed here: hide one, as a venv without it would lack it.
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "jax" else real(name, *a))
    with pytest.raises(ConfigError, match=r"the jax backend needs jax: pip install "
                                          r"'tapserve\[jax\]'"):
        backends.select("jax")
