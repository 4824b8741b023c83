"""The CLI as the tests run it: in this process (fast, exceptions visible) or as a new process."""

import os
import subprocess
import sys
from pathlib import Path

from qdylora_cli import cli

REPO = Path(__file__).resolve().parents[1]


def qdylora(*args: str) -> int:
    """Run the CLI in-process; returns the exit code (0 when it returns normally)."""
    try:
        cli.main(list(args))
    except SystemExit as e:
        return e.code
    return 0


def qdylora_process(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """The real command in a new process from this checkout, stdout and stderr captured apart (neither
    is a terminal); wide columns so that help tables do not wrap."""
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
                        "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "qdylora_cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=timeout)
