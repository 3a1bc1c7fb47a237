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
