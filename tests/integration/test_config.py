"""The tests of ``tests/unit/test_config.py``'s subject that start Ray or a subprocess."""

import subprocess
import sys

from tests.unit.test_config import REPO


def test_cli_refuses_unknown_key_with_exit_code_2(tmp_path):
    result = subprocess.run(
        [sys.executable, "run.py", "collect", "--set", "collect.episodez=3", "--set", f"runs_dir={tmp_path}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2
    assert "episodez" in result.stderr
    assert not any(tmp_path.iterdir()), "a refused config must not start any work"
