"""The checked-in generated code is what protos/generate.py makes from protos/ today."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ROOT / "service" / "protocol" / "generated"


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "protos" / "generate.py"), "--out", str(tmp_path)],
        check=True, capture_output=True,
    )
    fresh_dir = tmp_path / "service" / "protocol" / "generated"
    fresh = sorted(p.name for p in fresh_dir.iterdir() if p.is_file())
    checked_in = sorted(p.name for p in GENERATED.iterdir() if p.is_file())
    assert fresh == checked_in, "run: python protos/generate.py"
    for name in fresh:
        assert (fresh_dir / name).read_bytes() == (GENERATED / name).read_bytes(), (
            f"{name} is stale; run: python protos/generate.py"
        )
