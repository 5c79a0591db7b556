"""What an operator reads: --help of every command, flag and config.yaml errors that say
what to fix, and docs that list every setting."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from service.cli import _parser, main
from service.config import load_config
from service.errors import ConfigError
from service.settings import Settings

CONFIGURATION = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"


@pytest.mark.parametrize("argv", [["--help"], ["serve", "--help"], ["inspect", "--help"]])
def test_help_of_every_command_prints(argv: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as done:
        _parser().parse_args(argv)
    assert done.value.code == 0
    assert "usage: tapserve" in capsys.readouterr().out


def test_serve_help_lists_every_setting(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(["serve", "--help"])
    text = capsys.readouterr().out
    for name in Settings.model_fields:
        assert f"--{name.replace('_', '-')}" in text, name
        assert f"TAPSERVE_{name.upper()}" in text.replace("\n", "").replace(" ", ""), name


def test_docs_settings_table_lists_every_setting() -> None:
    section = CONFIGURATION.read_text().split("\n## Settings\n", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"`--([a-z0-9-]+)", section))
    missing = [n for n in Settings.model_fields if n.replace("_", "-") not in listed]
    assert not missing, f"docs/configuration.md's Settings table lacks {missing}"


def test_a_bad_flag_names_the_flag_and_not_pydantic(capsys: pytest.CaptureFixture) -> None:
    assert main(["serve", "--grpc-port", "abc", "--max-batch-size", "0"]) == 2
    err = capsys.readouterr().err
    assert "--grpc-port (env TAPSERVE_GRPC_PORT): Input should be a valid integer" in err
    assert "--max-batch-size (env TAPSERVE_MAX_BATCH_SIZE)" in err
    assert "pydantic" not in err and "Traceback" not in err


def test_an_unknown_config_key_suggests_the_right_one(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("batching:\n  max_batchsize: 3\nversion_policy: {latest: 1, foo: 2}\n"
                    "endpoints:\n  a: {inputs: [x], output: [y]}\n")
    with pytest.raises(ConfigError) as failed:
        load_config(path)
    message = str(failed.value)
    assert ("unknown key `max_batchsize` in batching; did you mean `max_batch_size`? keys: "
            "dedup_rows, eager, max_batch_size") in message
    assert "unknown key `output` in endpoints.a; did you mean `outputs`?" in message
    # A union reports the branch the value came closest to, not every branch.
    assert "unknown key `foo` in version_policy; keys: latest" in message
    assert "SpecificPolicy" not in message and "literal" not in message
    assert "pydantic" not in message
