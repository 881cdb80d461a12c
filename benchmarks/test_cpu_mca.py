"""benchmarks/cpu_mca.py: the loops it cuts out of the assembly are the kernels' own, and the GEMM
micro-kernel keeps its accumulators in registers at every vector width (a spill there would cost
every score and P V product)."""

import json
import os
import shutil
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cpu_mca  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("g++") is None or shutil.which("llvm-mca") is None,
                                reason="needs g++ and llvm-mca")

# (march, lanes) -> the micro-kernel's register block, kGemmRows x kGemmVectors (csrc/cpu/gemm.h);
# 4 lanes with AVX2's FMA, as tests/test_cpu_lanes.py builds them
GENERIC = {("x86-64-v3", 4): 4 * 2, ("x86-64-v3", 8): 6 * 2, ("x86-64-v4", 16): 6 * 4}


@pytest.mark.parametrize("march,lanes", list(GENERIC))
def test_gemm_loop_is_the_register_block_without_spills(tmp_path, march, lanes):
    t = cpu_mca.analyse(march, lanes, str(tmp_path))
    gemm = t["loops"]["gemm"]
    assert gemm["fmas"] == GENERIC[(march, lanes)], gemm
    assert gemm["stack_refs"] == 0, gemm
    assert gemm["cycles"] > 0 and t["gemm_fma_lanes_per_cycle"] <= 2 * lanes + 1e-6  # at most two FMA ports
    for name in ("exp", "log"):  # these may reload a constant from the stack where registers run out
        assert t["loops"][name]["cycles"] > 0 and t["loops"][name]["instructions"] > 10, t["loops"][name]


def test_hottest_loop_takes_the_inner_straight_line_loop():
    body = ["\tmovl\t$0, %eax",
            ".L2:", "\tvmovups\t(%rdi), %ymm0",
            ".L3:", "\tvfmadd231ps\t%ymm0, %ymm1, %ymm2", "\tvfmadd231ps\t%ymm0, %ymm1, %ymm3", "\tjne\t.L3",
            "\tvaddps\t%ymm2, %ymm3, %ymm4", "\tvmovups\t%ymm4, (%rsi)", "\tjne\t.L2",
            "\tret"]
    loop = cpu_mca.hottest_loop(body)
    assert [x.split()[0] for x in loop] == ["vfmadd231ps", "vfmadd231ps", "jne"]
    with pytest.raises(RuntimeError, match="no loop"):
        cpu_mca.hottest_loop(["\tret"])


def test_main_writes_the_table(tmp_path, capsys):
    assert cpu_mca.main(["--targets", "x86-64-v3:8", "--out", str(tmp_path)]) == 0
    data = json.load(open(tmp_path / "cpu_mca.json"))
    (t,) = data["targets"]
    assert t["march"] == "x86-64-v3" and t["lanes"] == 8
    m = t["forward_model"]
    assert m["ral"] > m["sdpa"] > 0 and 0 < m["elementwise_share"] < 1
    assert "| x86-64-v3 / x86-64-v3 | 8 |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cpu_mca.main(["--targets", "x86-64-v3:12"])
