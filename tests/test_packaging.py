"""pyproject.toml's dependencies: every pin exact and equal to constraints.txt's, the
backends only in their extras, no path from the no-TensorFlow install (`.[jax,test]`, the
JAX venv scripts/test.sh builds) to TensorFlow, read from the installed packages' own
metadata; and a server asked for a backend that is not installed names the extra."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
EXTRAS: dict[str, list[str]] = PROJECT["optional-dependencies"]
# Anything that is or brings TensorFlow (tensorflow-serving-api requires it).
TENSORFLOW = {"tensorflow", "tensorflow-cpu", "tensorflow-intel", "tensorflow-serving-api",
              "tf-keras", "tensorboard"}


def pins(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            out[canonicalize_name(name)] = version.strip()
    return out


def test_every_dependency_is_pinned_exactly_as_constraints_pins_it() -> None:
    constraints = pins(ROOT / "constraints.txt")
    for group, requirements in [("base", PROJECT["dependencies"]), *EXTRAS.items()]:
        for text in requirements:
            requirement = Requirement(text)
            (spec,) = requirement.specifier
            assert spec.operator == "==", f"{group}: {text} is not pinned exactly"
            name = canonicalize_name(requirement.name)
            assert constraints.get(name) == spec.version, (
                f"{group}: {text}, constraints.txt has {constraints.get(name)}")


def test_backends_come_only_from_their_extras() -> None:
    base = {canonicalize_name(Requirement(r).name) for r in PROJECT["dependencies"]}
    assert not base & (TENSORFLOW | {"jax", "jaxlib"}), base
    names = {extra: {canonicalize_name(Requirement(r).name) for r in reqs}
             for extra, reqs in EXTRAS.items()}
    assert names["tensorflow"] == {"tensorflow"}
    assert names["jax"] == {"jax", "jaxlib"}
    assert "tensorflow-serving-api" in names["test-tensorflow"]
    for extra in ("jax", "jax-cuda", "test", "examples"):
        assert not names[extra] & TENSORFLOW, (extra, names[extra])


def test_the_jax_gpu_pins_follow_the_jax_pin() -> None:
    """jax[cuda13] pins its plugin to jaxlib's version exactly: the GPU image's constraints
    (deploy/constraints-jax-cuda.txt) must move with the project's jax pin."""
    jax = {canonicalize_name(Requirement(r).name): Requirement(r) for r in EXTRAS["jax"]}
    version = next(iter(jax["jaxlib"].specifier)).version
    (cuda,) = (Requirement(r) for r in EXTRAS["jax-cuda"])
    assert cuda.name == "jax" and cuda.extras == {"cuda13"}
    assert str(cuda.specifier) == str(jax["jax"].specifier)
    gpu = pins(ROOT / "deploy" / "constraints-jax-cuda.txt")
    assert gpu["jax-cuda13-plugin"] == version and gpu["jax-cuda13-pjrt"] == version, gpu
    assert len([n for n in gpu if n.startswith("nvidia-")]) >= 10, gpu


def closure(requirements: list[str]) -> dict[str, str]:
    """Every distribution the requirements pull, as installed here: name -> who asked."""
    seen: dict[str, str] = {}
    todo = [(Requirement(r), "tapserve") for r in requirements]
    while todo:
        requirement, parent = todo.pop()
        name = canonicalize_name(requirement.name)
        if name in seen:
            continue
        seen[name] = parent
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            pytest.fail(f"{name} (asked for by {parent}) is not installed")
        for text in requires:
            child = Requirement(text)
            wanted = requirement.extras or {""}
            if child.marker is None or any(child.marker.evaluate({"extra": e}) for e in wanted):
                todo.append((child, name))
    return seen


@pytest.mark.parametrize("extras", [("jax", "test"), ("jax", "examples")])
def test_the_no_tensorflow_install_pulls_no_tensorflow(extras: tuple[str, ...]) -> None:
    """What scripts/test.sh installs into .venv-jax, walked through installed metadata (so
    a new test tool that depends on TensorFlow fails here, not in CI's JAX venv)."""
    pytest.importorskip("jax")
    requirements = list(PROJECT["dependencies"])
    for extra in extras:
        requirements += EXTRAS[extra]
    pulled = closure(requirements)
    assert not pulled.keys() & TENSORFLOW, {n: pulled[n] for n in pulled.keys() & TENSORFLOW}


@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_a_backend_that_is_not_installed_names_its_extra(backend: str, tmp_path: Path) -> None:
    """`pip install tapserve` brings no backend. Runs where the backend is really missing:
    tensorflow in the JAX venv (scripts/test.sh), jax in the TensorFlow image."""
    if importlib.util.find_spec(backend) is not None:
        pytest.skip(f"{backend} is installed here")
    tapserve = Path(sys.executable).parent / "tapserve"  # the installed command, as users run it
    env = {**os.environ, "TAPSERVE_BACKEND": backend, "TAPSERVE_LOG_FORMAT": "text"}
    env.pop("KERAS_BACKEND", None)
    # Loopback and free ports: should it start after all, it holds nothing of anyone's.
    done = subprocess.run([str(tapserve), "serve", "--model-repository", str(tmp_path),
                           "--host", "127.0.0.1", "--grpc-port", "0", "--metrics-port", "0",
                           "--http-port", "0"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"pip install 'tapserve[{backend}]'" in done.stderr, done.stderr
