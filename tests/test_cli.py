"""The console entry point dispatches subcommands and rejects unknown ones."""

import subprocess
import sys

from megatron_dispo.cli import SUBCOMMANDS, main


def test_help_lists_every_subcommand(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert name in out


def test_unknown_subcommand_is_an_error(capsys):
    try:
        main(["no-such-command"])
    except SystemExit as exc:
        assert exc.code == 2
    else:
        raise AssertionError("unknown command did not exit with an error")
    assert "unknown command 'no-such-command'" in capsys.readouterr().err


def test_python_dash_m_runs_the_same_cli():
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_dispo", "--help"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0
    assert "megatron-dispo" in proc.stdout
