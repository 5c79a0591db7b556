"""Shell scripts' logic that a test can run without root: base-image.sh takes its Debian
mirror from the machine's apt configuration, never from a host name written in the repo."""

from __future__ import annotations

import subprocess
from pathlib import Path

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
