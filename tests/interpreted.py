"""Running Triton kernel checks under the interpreter, in a child pytest.

``TRITON_INTERPRET=1`` must be set before triton itself is imported (``tl.zeros`` & co. are
decorated at import time), and setting it in the test process would also turn every later Triton
kernel of the session (Inductor on a GPU) into interpreted code. So a test file keeps its kernel
checks in ``check_*`` functions, which the default collection ignores, and one ``test_*`` runs them
in a child pytest with ``TRITON_INTERPRET=1`` and ``-o python_functions=check_``.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest


def run_checks_in_child(test_file: str, minimum: int, timeout: int = 600) -> None:
    """Run ``test_file``'s ``check_*`` functions interpreted; fail with the child's report, or when
    fewer than ``minimum`` passed (a collection problem must not pass silently)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [sys.executable, "-m", "pytest", test_file, "-q", "-p", "no:cacheprovider",
               "-o", "python_functions=check_"]
    child = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=timeout)
    report = child.stdout + child.stderr
    assert child.returncode == 0, f"interpreted kernel checks failed:\n{report}"
    passed = re.search(r"(\d+) passed", report)
    assert passed and int(passed.group(1)) >= minimum, f"too few checks ran:\n{report}"


def require_interpreter() -> None:
    """Skip a ``check_*`` run outside the child (``pytest -o python_functions=check_`` by hand without the variable)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("check_* functions need TRITON_INTERPRET=1 (see tests/interpreted.py)")
