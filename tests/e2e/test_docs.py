"""The docs' walkthroughs, run as written: each page's ```bash and ```python blocks in
order, in a fresh folder, against a real `tapserve serve` (the page's own `tapserve serve`
command, on free ports). A doc that drifts from the server fails here."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from backends import frontend_only
from ports import free_port

pytestmark = frontend_only  # the front doors only: the same on every backend
DOCS = Path(__file__).resolve().parents[2] / "docs"
BLOCK = re.compile(r"^```(bash|python|console)\n(.*?)^```", re.S | re.M)
# Set-up lines a reader runs once in their shell; the test's environment already has them.
SETUP = ("source .venv/bin/activate", "pip install ")


def run_page(page: Path, folder: Path, start_process, poll_secs: str = "1") -> None:
    namespace: dict[str, object] = {}
    printed = ""  # what the last bash block printed, for a ```console block after it
    grpc_port, http_port = free_port(), free_port()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    for number, (language, code) in enumerate(BLOCK.findall(page.read_text()), 1):
        code = re.sub(r"\b(localhost|127\.0\.0\.1):8001\b", rf"\1:{grpc_port}", code)
        code = re.sub(r"\b(localhost|127\.0\.0\.1):8000\b", rf"\1:{http_port}", code)
        where = f"{page.name}, block {number} ({language}):\n{code}"
        if language == "console":  # each line shown, but for the elided ones, was printed
            shown = [line for line in code.splitlines() if "..." not in line]
            missing = [line for line in shown if line.rstrip() not in printed]
            assert not missing, f"{where}\nnot printed: {missing}\nprinted:\n{printed}"
            continue
        if language == "python":
            exec(compile(code, where, "exec"), namespace)  # noqa: S102 - the doc's own code
            continue
        if code.startswith("tapserve serve"):
            flags = shlex.split(code.replace("\\\n", " "))[2:] + [
                "--host", "127.0.0.1", "--grpc-port", str(grpc_port), "--http-port",
                str(http_port), "--metrics-port", "0", "--repository-poll-secs", poll_secs]
            start_process(None, *flags, ready=False)
            continue
        script = "\n".join(line for line in code.splitlines() if not line.startswith(SETUP))
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=folder, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{where}\n{done.stdout}\n{done.stderr}"
        printed = done.stdout


@pytest.mark.skipif(shutil.which("curl") is None, reason="the page's commands use curl")
def test_serve_your_own_model_runs_as_written(tmp_path: Path, start_process,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the page's Python works in the reader's folder too
    run_page(DOCS / "serve-your-own-model.md", tmp_path, start_process)


@pytest.mark.skipif(shutil.which("curl") is None or shutil.which("openssl") is None,
                    reason="the page's commands use openssl and curl")
def test_local_tls_certificates_recipe_runs_as_written(tmp_path: Path, start_process,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "models").mkdir()  # the reader's repository; liveness needs no model
    monkeypatch.chdir(tmp_path)
    run_page(DOCS / "tls.md", tmp_path, start_process)
