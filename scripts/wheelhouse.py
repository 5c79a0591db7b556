"""The wheels a GPU machine lacks to run Tapserve on JAX, for an offline install there.

    python3 scripts/wheelhouse.py                       # -> .wheelhouse/ (Python 3.12)
    python3 scripts/wheelhouse.py --python-version 3.11 --dest /tmp/wh311   # a dry run here

The accelerator machines this project is lent have Python 3.12, JAX with CUDA and the
packages in DEVICE_HAS, and no network. This walks Tapserve's dependencies (pyproject's
`dependencies` and its `jax` extra, TensorFlow left out) and their requirements, stops at
what the device has, and downloads the rest with `pip download --no-deps` for CPython
`--python-version` on manylinux x86_64 through this machine's own pip configuration.
Versions come from constraints.txt: one that a package's requirements exclude is an error,
as is a package with no pin. What the wheels ask of the device's own packages (grpcio,
protobuf, ...) goes to DEST/device-requirements.txt, which scripts/device-check.sh checks
there before it starts anything. Tapserve itself travels as source (PYTHONPATH).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

try:
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
except ImportError:  # a bare Python: pip carries its own copy
    from pip._vendor.packaging.requirements import Requirement  # type: ignore[no-redef]
    from pip._vendor.packaging.specifiers import SpecifierSet  # type: ignore[no-redef]

try:
    import tomllib
except ImportError:  # Python < 3.11: pip carries tomli
    from pip._vendor import tomli as tomllib  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parent.parent
# What the GPU machine has installed (besides the standard library): JAX with the CUDA
# plugins and these. Their own requirements are the device's business.
DEVICE_HAS = frozenset({
    "jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda13-pjrt", "grpcio", "protobuf",
    "prometheus-client", "aiohttp", "h5py", "pyyaml", "numpy", "ml-dtypes", "scipy",
    "absl-py", "packaging", "opt-einsum"})
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")
# Fetch(pins) downloads each (name, version) and returns each name's Requires-Dist lines.
Fetch = Callable[[list[tuple[str, str]]], dict[str, list[str]]]


def normalize(name: str) -> str:
    """PEP 503's form of a distribution name: `PyYAML` and `pyyaml`, `ml_dtypes` and
    `ml-dtypes` are one package."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(constraints: Path) -> dict[str, str]:
    """`name==version` lines of a constraints file, by normalized name."""
    pins = {}
    for line in constraints.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[normalize(name.split("[")[0])] = version.strip()
    return pins


def roots(pyproject: Path) -> list[str]:
    """What Tapserve on JAX depends on: the base dependencies and the `jax` extra,
    without TensorFlow (which the device lacks and the JAX backend never imports)."""
    project = tomllib.loads(pyproject.read_text())["project"]
    wanted = [*project["dependencies"], *project.get("optional-dependencies", {}).get("jax", [])]
    return [r for r in wanted if not normalize(Requirement(r).name).startswith("tensorflow")]


def target_environment(python_version: str) -> dict[str, str]:
    """Marker values of the device (CPython on x86_64 Linux)."""
    return {"python_version": python_version, "python_full_version": f"{python_version}.0",
            "implementation_name": "cpython", "platform_python_implementation": "CPython",
            "sys_platform": "linux", "platform_system": "Linux", "os_name": "posix",
            "platform_machine": "x86_64"}


def applies(requirement: Requirement, env: dict[str, str], extras: Iterable[str]) -> bool:
    """Whether a requirement holds on the device for a package asked with `extras`."""
    if requirement.marker is None:
        return True
    return any(requirement.marker.evaluate({**env, "extra": e}) for e in ("", *extras))


def resolve(wanted: list[str], pins: dict[str, str], device_has: frozenset[str],
            env: dict[str, str], fetch: Fetch) -> tuple[dict[str, str], dict[str, SpecifierSet]]:
    """The wheels to download ({name: pinned version}) and what they ask of the device's
    packages ({name: specifiers}), level by level: `fetch` downloads one level and says
    what each of its packages requires."""
    chosen: dict[str, str] = {}
    device: dict[str, SpecifierSet] = {}
    extras: dict[str, set[str]] = {}
    level = [(Requirement(r), "pyproject.toml") for r in wanted]
    while level:
        batch: list[tuple[str, str]] = []
        for req, by in level:
            name = normalize(req.name)
            if name in device_has:  # the device's version, not our pin: only what wheels ask
                asked = SpecifierSet() if by == "pyproject.toml" else req.specifier
                device[name] = device.get(name, SpecifierSet()) & asked
                continue
            if name not in pins:
                raise SystemExit(f"wheelhouse: {name} (required by {by}) has no pin in "
                                 "constraints.txt")
            if pins[name] not in req.specifier:
                raise SystemExit(f"wheelhouse: {by} requires {req}, constraints.txt pins "
                                 f"{name}=={pins[name]}")
            extras.setdefault(name, set()).update(req.extras)
            if name not in chosen:
                chosen[name] = pins[name]
                batch.append((name, pins[name]))
        fetched = fetch(batch) if batch else {}
        level = [(r, name) for name, lines in fetched.items()
                 for r in map(Requirement, lines) if applies(r, env, extras[name])]
    return chosen, device


def wheel_requires(wheel: Path) -> list[str]:
    """A wheel's Requires-Dist lines (its METADATA)."""
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist()
                    if n.count("/") == 1 and n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    headers = text.split("\n\n", 1)[0]
    return [line.split(":", 1)[1].strip() for line in headers.splitlines()
            if line.startswith("Requires-Dist:")]


def wheel_of(dest: Path, name: str) -> Path:
    return next(w for w in dest.glob("*.whl") if normalize(w.name.split("-")[0]) == name)


def pip_fetch(dest: Path, python_version: str) -> Fetch:
    """Fetch through `pip download`: binary wheels for the device's Python and platform."""
    def fetch(batch: list[tuple[str, str]]) -> dict[str, list[str]]:
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                   "--only-binary=:all:", "--python-version", python_version,
                   "--implementation", "cp", "--dest", str(dest)]
        for platform in PLATFORMS:
            command += ["--platform", platform]
        done = subprocess.run(command + [f"{n}=={v}" for n, v in batch],
                              capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"wheelhouse: pip download failed:\n{done.stderr}")
        return {name: wheel_requires(wheel_of(dest, name)) for name, _ in batch}
    return fetch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=ROOT / ".wheelhouse")
    parser.add_argument("--python-version", default="3.12")
    parser.add_argument("--constraints", type=Path, default=ROOT / "constraints.txt")
    parser.add_argument("--pyproject", type=Path, default=ROOT / "pyproject.toml")
    parser.add_argument("--max-mb", type=float, default=40.0)
    args = parser.parse_args()

    shutil.rmtree(args.dest, ignore_errors=True)
    args.dest.mkdir(parents=True)
    chosen, device = resolve(roots(args.pyproject), read_pins(args.constraints), DEVICE_HAS,
                             target_environment(args.python_version),
                             pip_fetch(args.dest, args.python_version))
    lines = [f"{name}{spec}" for name, spec in sorted(device.items())]
    (args.dest / "device-requirements.txt").write_text(
        "# What these wheels ask of the device's own packages (scripts/wheelhouse.py)\n"
        + "\n".join(lines) + "\n")
    wheels = sorted(args.dest.glob("*.whl"))
    size = sum(w.stat().st_size for w in wheels) / 1e6
    for w in wheels:
        print(f"  {w.stat().st_size / 1e6:6.2f} MB  {w.name}")
    print(f"wheelhouse: {len(wheels)} wheels for Python {args.python_version}, {size:.1f} MB "
          f"in {args.dest}; the device must have: {', '.join(lines)}")
    if size > args.max_mb:
        raise SystemExit(f"wheelhouse: {size:.1f} MB is over --max-mb {args.max_mb:g}")


if __name__ == "__main__":
    main()
