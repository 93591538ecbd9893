"""The command line: every subcommand has --help, bad arguments give one error line and a non-zero exit."""

from __future__ import annotations

import subprocess
import sys

import pytest

from busbench.cli import COMMANDS, _available, main

AVAILABLE = [name for name, (module, _) in COMMANDS.items() if _available(module)]


def test_top_level_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for name in AVAILABLE:
        assert name in out


@pytest.mark.parametrize("command", AVAILABLE)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert f"busbench {command}" in capsys.readouterr().out


@pytest.mark.parametrize("command", AVAILABLE)
def test_bad_option_is_one_line_error(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--no-such-option"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len([line for line in err if "error:" in line]) == 1
    # argparse names the unknown option, or first the required arguments that are missing
    assert err[-1].startswith(f"busbench {command}: error: ")
    assert "--no-such-option" in err[-1] or "arguments are required" in err[-1]
    assert err[-1].endswith(f"(see busbench {command} --help)")


def test_unknown_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["frobnicate"])
    assert exit_.value.code == 2
    assert "invalid choice: 'frobnicate'" in capsys.readouterr().err


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "usage: busbench" in capsys.readouterr().out


def test_console_script_and_module_entry_point():
    out = subprocess.run(
        [sys.executable, "-m", "busbench", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.startswith("busbench ")


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_listed_command_has_a_working_module(command):
    """A command in COMMANDS whose module is missing would vanish from --help silently; each one must exist."""
    import importlib

    module = COMMANDS[command][0]
    assert _available(module), f"busbench {command}: module {module} does not exist"
    loaded = importlib.import_module(module)
    assert callable(loaded.add_arguments) and callable(loaded.run)
