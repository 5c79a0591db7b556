"""`tapserve` command-line parsing."""

from __future__ import annotations

import pytest

from service.cli import _parser


def test_serve_help_prints(capsys: pytest.CaptureFixture[str]) -> None:
    # A setting's description holds a literal "%" (argparse's format character).
    with pytest.raises(SystemExit) as exited:
        _parser().parse_args(["serve", "--help"])
    assert exited.value.code == 0
    assert "7-14% of" in capsys.readouterr().out
