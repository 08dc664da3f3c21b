"""``python -m ierf`` is the ``ierf`` command for interpreters whose console scripts are not on PATH."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import ierf


def test_python_dash_m_ierf_runs_the_cli_and_returns_its_exit_status():
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(ierf.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
    }
    ok = subprocess.run(
        [sys.executable, "-m", "ierf", "--version"], capture_output=True, text=True, env=env, timeout=120
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == f"ierf {ierf.__version__}"
    bad = subprocess.run(
        [sys.executable, "-m", "ierf", "explain"], capture_output=True, text=True, env=env, timeout=120
    )
    assert bad.returncode == 2 and "usage: ierf" in bad.stderr
