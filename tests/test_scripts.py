"""Scripts' logic that a test can run without root or network: base-image.sh takes its
Debian mirror from the machine's apt configuration, never from a host name written in the
repo; wheelhouse.py resolves the wheels a GPU machine lacks from constraints.txt."""

from __future__ import annotations

import subprocess
import zipfile
from pathlib import Path

import pytest
import zoo

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def apt_mirror(apt_etc: Path) -> str:
    """Run base-image.sh's apt_mirror function alone against a fake /etc/apt."""
    function = subprocess.run(
        ["sed", "-n", "/^apt_mirror() {/,/^}/p", str(SCRIPTS / "base-image.sh")],
        capture_output=True, text=True, check=True).stdout
    assert function, "base-image.sh has no apt_mirror function"
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", function + "\napt_mirror"],
                          capture_output=True, text=True, check=True,
                          env={"APT_ETC": str(apt_etc), "PATH": "/usr/bin:/bin"})
    return done.stdout.strip()


def test_the_mirror_comes_from_deb822_sources(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.invalid/debian-security\nSuites: bookworm-security\n"
        "Components: main\n\n"
        "Types: deb-src deb\n# a comment\nURIs: http://mirror.invalid/debian\n"
        "Suites: bookworm bookworm-updates\nComponents: main\n")
    assert apt_mirror(tmp_path) == "http://mirror.invalid/debian"


def test_the_mirror_comes_from_a_one_line_sources_list(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list").write_text(
        "# deb http://commented.invalid/debian bookworm main\n"
        "deb http://proxy.invalid/security bookworm-security main\n"
        "deb [arch=amd64 signed-by=/k.gpg] http://proxy.invalid/debian bookworm main\n")
    assert apt_mirror(tmp_path) == "http://proxy.invalid/debian"


def test_no_source_gives_nothing(tmp_path: Path) -> None:
    assert apt_mirror(tmp_path) == ""


# scripts/wheelhouse.py: which wheels a GPU machine lacks, resolved without downloading
# (a fake `fetch` stands in for pip download and answers each wheel's Requires-Dist).
WHEELHOUSE = zoo.import_script(SCRIPTS / "wheelhouse.py", "wheelhouse")
PY312 = WHEELHOUSE.target_environment("3.12")
FAKE_REQUIRES = {
    "keras": ["absl-py", "numpy", "rich", "namex", "optree", "packaging"],
    "rich": ["markdown-it-py>=2.2.0", "pygments<3.0.0,>=2.13.0"],
    "markdown-it-py": ["mdurl~=0.1"],
    "grpcio-health-checking": ["protobuf<7.0.0,>=6.33.5", "grpcio>=1.81.1"],
    "optree": ["typing-extensions>=4.10.0", 'typing-extensions>=4.12.0; python_version >= "3.13"',
               'numpy; extra == "numpy"'],
    "pydantic": ["annotated-types>=0.6.0", "typing-extensions>=4.14.1",
                 'tzdata; python_version >= "3.9" and platform_system == "Windows"',
                 'email-validator>=2.0.0; extra == "email"'],
}


def fake_project(tmp_path: Path, pins: str) -> tuple[Path, Path]:
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "x"\ndependencies = ["tensorflow==2.21.0", "keras==3.15.1", '
        '"grpcio==1.85.1", "grpcio-health-checking==1.81.1", "pydantic==2.14.3", '
        '"PyYAML==6.0.3", "tensorflow-serving-api==2.21.0"]\n'
        '[project.optional-dependencies]\njax = ["jax==0.10.2"]\ntest = ["pytest==9.2.0"]\n')
    (tmp_path / "constraints.txt").write_text(pins)
    return tmp_path / "pyproject.toml", tmp_path / "constraints.txt"


PINS = ("# a comment\nkeras==3.15.1\nrich==15.0.0\nmarkdown-it-py==4.3.0\nmdurl==0.1.2\n"
        "Pygments==2.21.0\nnamex==0.1.0\noptree==0.20.0\ntyping_extensions==4.16.0\n"
        "grpcio-health-checking==1.81.1\npydantic==2.14.3\nannotated-types==0.8.0\n"
        "numpy==2.4.6\ngrpcio==1.85.1  # trailing comment\n")


def resolve(pyproject: Path, constraints: Path, fetched: list[list[tuple[str, str]]]) -> tuple:
    def fetch(batch: list[tuple[str, str]]) -> dict[str, list[str]]:
        fetched.append(batch)
        return {name: FAKE_REQUIRES.get(name, []) for name, _ in batch}
    return WHEELHOUSE.resolve(WHEELHOUSE.roots(pyproject), WHEELHOUSE.read_pins(constraints),
                              WHEELHOUSE.DEVICE_HAS, PY312, fetch)


def test_the_wheelhouse_walks_requirements_and_stops_at_what_the_device_has(
        tmp_path: Path) -> None:
    fetched: list[list[tuple[str, str]]] = []
    chosen, device = resolve(*fake_project(tmp_path, PINS), fetched)
    # TensorFlow and the test extra left out; the device's own packages not downloaded;
    # markers for other Pythons, other systems and extras not asked for left out.
    assert chosen == {"keras": "3.15.1", "grpcio-health-checking": "1.81.1",
                      "pydantic": "2.14.3", "rich": "15.0.0", "namex": "0.1.0",
                      "optree": "0.20.0", "annotated-types": "0.8.0",
                      "typing-extensions": "4.16.0", "markdown-it-py": "4.3.0",
                      "pygments": "2.21.0", "mdurl": "0.1.2"}
    # Downloaded level by level, each wheel once.
    assert [sorted(n for n, _ in b) for b in fetched][0] == [
        "grpcio-health-checking", "keras", "pydantic"]
    assert sum(len(b) for b in fetched) == len(chosen)
    # The device keeps its versions: pyproject's pins are not asked of it, the wheels'
    # requirements are.
    assert {k: str(v) for k, v in device.items()} == {
        "grpcio": ">=1.81.1", "protobuf": "<7.0.0,>=6.33.5", "numpy": "", "absl-py": "",
        "packaging": "", "jax": "", "pyyaml": ""}


def test_a_pin_that_a_requirement_excludes_is_an_error(tmp_path: Path) -> None:
    pins = PINS.replace("typing_extensions==4.16.0", "typing_extensions==4.12.0")
    with pytest.raises(SystemExit, match=r"pydantic requires typing-extensions>=4.14.1, "
                       r"constraints.txt pins typing-extensions==4.12.0"):
        resolve(*fake_project(tmp_path, pins), [])


def test_a_package_without_a_pin_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=r"mdurl \(required by markdown-it-py\) has no pin"):
        resolve(*fake_project(tmp_path, PINS.replace("mdurl==0.1.2\n", "")), [])


def test_requirements_are_read_from_the_wheel_metadata(tmp_path: Path) -> None:
    wheel = tmp_path / "namex-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("namex/__init__.py", "")
        z.writestr("namex-0.1.0.dist-info/METADATA",
                   "Metadata-Version: 2.1\nName: namex\nRequires-Dist: rich\n"
                   "Requires-Dist: numpy; extra == 'numpy'\n\nRequires-Dist: in the body\n")
    assert WHEELHOUSE.wheel_requires(wheel) == ["rich", "numpy; extra == 'numpy'"]
    assert WHEELHOUSE.wheel_of(tmp_path, "namex") == wheel


def test_every_dependency_of_the_real_project_is_pinned() -> None:
    root = SCRIPTS.parent
    pins = WHEELHOUSE.read_pins(root / "constraints.txt")
    wanted = WHEELHOUSE.roots(root / "pyproject.toml")
    names = {WHEELHOUSE.normalize(r.split("=")[0].split("[")[0]) for r in wanted}
    assert "keras" in names and not any(n.startswith("tensorflow") for n in names)
    assert names <= set(pins)


# scripts/device_check.py: the device's own packages against what the wheels ask.
DEVICE_CHECK = zoo.import_script(SCRIPTS / "device_check.py", "device_check")


def test_the_device_check_refuses_packages_the_wheels_cannot_use(tmp_path: Path) -> None:
    requirements = tmp_path / "device-requirements.txt"
    requirements.write_text("# a comment\ngrpcio>=1.0\nprotobuf<99,>=3\nnumpy\n")
    DEVICE_CHECK.check_requirements(requirements)  # this venv has all three
    requirements.write_text("grpcio>=99\n")
    with pytest.raises(DEVICE_CHECK.CheckFailed, match=r"has grpcio \S+; the wheels need "
                       r"grpcio>=99"):
        DEVICE_CHECK.check_requirements(requirements)
    requirements.write_text("no-such-package-here\n")
    with pytest.raises(DEVICE_CHECK.CheckFailed, match="lacks no-such-package-here"):
        DEVICE_CHECK.check_requirements(requirements)


def test_the_device_check_says_when_the_wheelhouse_is_missing(tmp_path: Path) -> None:
    done = subprocess.run(["bash", str(SCRIPTS / "device-check.sh")], capture_output=True,
                          text=True, env={"WHEELHOUSE": str(tmp_path / "none"),
                                          "SITE": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 1
    assert "device-check: FAILED: no wheels in" in done.stderr
    assert "scripts/wheelhouse.py" in done.stderr
    assert not (tmp_path / "site").exists()
