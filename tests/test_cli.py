from __future__ import annotations

import subprocess
import sys

import pytest

from minisrv import __version__
from minisrv.cli import main


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"minisrv {__version__}"


def test_help_lists_subcommands() -> None:
    out = subprocess.run([sys.executable, "-m", "minisrv.cli", "--help"], capture_output=True, text=True, check=True)
    assert "usage: minisrv" in out.stdout
    assert "serve" in out.stdout


def test_unknown_subcommand_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2
    assert "invalid choice: 'frobnicate'" in capsys.readouterr().err
