"""The CPU kernels' tests at the vector widths this machine's install was not built for (tests/cpu_lanes.py):
each other width's module is built, and test_cpu.py, test_seqs_cpu.py, test_stats.py and test_varlen.py
run against it in a pytest process of their own (RAL_TEST_CPU_LANES, tests/conftest.py). On an AVX2
machine that is AVX-512's 16-lane logic and SSE's 4-lane logic; the target's own intrinsics (any, FMA)
are the only part a width's own build runs that this does not."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import cpu_lanes
from ral.backends import compiled as _compiled

HERE = os.path.dirname(os.path.abspath(__file__))
FILES = ["test_cpu.py", "test_seqs_cpu.py", "test_stats.py", "test_varlen.py"]
NATIVE = getattr(_compiled._C, "cpu_lanes", None)

pytestmark = pytest.mark.skipif(_compiled.import_error() is not None,
                                reason=f"ral._C not built: {_compiled.import_error()}")


@pytest.mark.parametrize("lanes", [n for n in cpu_lanes.WIDTHS if n != NATIVE], ids=lambda n: f"lanes{n}")
def test_cpu_kernels_at_another_vector_width(lanes):
    try:
        cpu_lanes.build(lanes)
    except cpu_lanes.Unavailable as err:
        pytest.skip(f"the forced-width build cannot run here: {err}")
    env = dict(os.environ, RAL_TEST_CPU_LANES=str(lanes))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *(os.path.join(HERE, f) for f in FILES)]
    done = subprocess.run(cmd, env=env, cwd=os.path.dirname(HERE), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    assert done.returncode == 0 and " passed" in summary and "failed" not in summary, \
        f"RAL_TEST_CPU_LANES={lanes}: {' '.join(cmd)}\n{done.stdout[-12000:]}"
