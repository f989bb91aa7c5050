"""The Triton kernels compile for a Hopper GPU (sm_90), checked ahead of time without one.

The interpreter runs the kernels' semantics but never compiles them; this runs the real compiler
pipeline (TTIR -> PTX -> cubin through the ptxas that ships with triton) for every flag
combination in bf16, in a subprocess because the test session runs Triton interpreted.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from renio_kernels.ops.divergences import DIVERGENCES

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.triton
def test_kernels_compile_for_sm90():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "compile_check.py"), "--quick", "--arch", "90"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    # bf16, every divergence of the registry, clip off/on, every forward and backward flag set
    expected = len(DIVERGENCES) * 2 * 6
    assert f"compiled {expected} kernel variants for sm_90" in out.stdout
    assert "compiled 3 top-k variants for sm_90" in out.stdout  # the streaming top-k, bf16
