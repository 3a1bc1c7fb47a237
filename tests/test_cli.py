import subprocess
import sys

from loopus import __version__


def test_version(cli):
    code, out, _ = cli("--version")
    assert code == 0 and __version__ in out


def test_help_lists_commands(cli):
    code, out, _ = cli("--help")
    assert code == 0
    assert "analyze" in out


def test_python_dash_m_entry_point():
    result = subprocess.run([sys.executable, "-m", "loopus", "--version"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and __version__ in result.stdout


def _main(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """``loopus ARGS`` through the console script's ``main`` (not typer's test runner): its exit code,
    stdout and stderr."""
    import pytest

    from loopus.cli import main

    monkeypatch.setattr(sys, "argv", ["loopus", *args])
    with pytest.raises(SystemExit) as stop:
        main()
    out, err = capsys.readouterr()
    return stop.value.code, out, err


def test_a_usage_error_is_one_line_with_exit_code_2(monkeypatch, capsys):
    for args, says in ((["analyze", "--mapp-tokens", "3"], "No such option: --mapp-tokens"),
                       (["analyze", "--map-tokens", "abc"], "Invalid value for '--map-tokens'"),
                       (["analyse"], "No such command 'analyse'")):
        code, out, err = _main(monkeypatch, capsys, *args)
        assert code == 2 and out == "", args
        assert err.count("\n") == 1 and err.startswith("error: ") and says in err and "--help" in err, err


def test_main_keeps_the_commands_exit_codes(monkeypatch, capsys):
    code, out, _ = _main(monkeypatch, capsys, "--version")
    assert code == 0 and __version__ in out
    code, _, err = _main(monkeypatch, capsys, "convert")  # the command's own one-line error
    assert code == 2 and err.startswith("error: --out DIR is required")
    code, out, _ = _main(monkeypatch, capsys)  # no command: the help, as before
    assert code == 2 and "analyze" in out
