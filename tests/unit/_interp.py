"""Running Triton kernels under the interpreter in a child process.

TRITON_INTERPRET=1 must be set before triton is imported and would change every later
Triton kernel in the process, so each interpreter test file runs itself as a script:
`run_cases` there, `run_self_interpreted` from the pytest process."""
from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_cases(cases: Sequence[tuple], case: Callable[..., str | None]) -> int:
    """Run case(*c) for every c (c[0] is its name); print each result; 1 if any failed."""
    failures = []
    for c in cases:
        msg = case(*c)
        if msg:
            failures.append(msg)
        print(f"{c[0]}: {msg or 'ok'}", flush=True)
    if failures:
        print("FAILED:\n" + "\n".join(failures), file=sys.stderr)
        return 1
    return 0


def run_self_interpreted(script: str, timeout: float) -> None:
    """Run `script` (a test file's __file__) with TRITON_INTERPRET=1; assert it exits 0."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, script], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
