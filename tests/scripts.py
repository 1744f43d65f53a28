"""Helpers for tests that run the command-line scripts: a run in a subprocess, and the one-line error (exit
status 2, no traceback) the scripts owe bad input."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_script(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python <script> args...`` from the repository root on the CPU (``script`` relative to the root)."""
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=timeout)


def assert_one_line_error(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def with_out(flags: list[str], out: Path) -> list[str]:
    """``flags`` plus ``--out out`` unless they name their own; skips a test whose ``--out`` is under a missing
    /proc (the unwritable place these tests use)."""
    if any(flag.startswith("/proc/") for flag in flags) and not Path("/proc/self").is_dir():
        pytest.skip("no /proc here")
    return [*flags] if "--out" in flags else [*flags, "--out", str(out)]
