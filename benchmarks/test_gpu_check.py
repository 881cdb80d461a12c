"""gpu_check.py: the dry run walks every step on a CPU machine and writes its report, and the
pieces the GPU run relies on (budget plan, pytest counts, goal verdicts, bench arguments) hold.

    python -m pytest -q benchmarks/test_gpu_check.py      # one dry run in a subprocess (~20-40 s)
"""

import json
import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import bench_memory  # noqa: E402
import gpu_check as G  # noqa: E402
import providers as P  # noqa: E402


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}   # a CPU machine, even where a GPU is visible
    done = subprocess.run([sys.executable, os.path.join(HERE, "gpu_check.py"), "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    return done, out


def test_dry_run_exits_0_and_prints_every_step_with_its_estimate(dry_run):
    done, _ = dry_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    for step in G.STEPS:
        announced = [ln for ln in lines if f"] {step.name} " in ln]
        assert announced, f"step {step.name} not printed"
        assert f"est {step.est_s:>4.0f} s" in announced[0] and "cap" in announced[0]
    assert "wrote " in lines[-1] and "gpu_check.json" in lines[-1]   # the short table comes last


def test_dry_run_json_records_every_step(dry_run):
    done, out = dry_run
    with open(out / "gpu_check.json") as fh:
        data = json.load(fh)
    assert data["dry_run"] is True
    steps = {s["name"]: s for s in data["steps"]}
    assert list(steps) == [s.name for s in G.STEPS]
    assert steps["env"]["status"] == "ok"
    for step in G.STEPS:
        got = steps[step.name]
        assert got["est_s"] == step.est_s and got["cap_s"] >= step.min_s, got
        assert got["status"] in ("ok", "skip"), got
        if step.gpu:
            assert got["summary"].startswith("dry run:"), got
    # the rehearsals ran: tests collected, the bench sweep measured every provider on the CPU
    assert steps["test-cuda"]["details"]["collected"] > 0
    assert steps["test-triton-cuda"]["details"]["collected"] > 0
    for name in G.BENCH_CONFIGS:
        rows = steps[name]["details"]["rows"]
        assert {r["provider"] for r in rows} >= {"sdpa-flash", "eager"}
        assert all(r["status"] == "ok" and r["time_s"] > 0 and r["repeats"] >= 1 for r in rows), rows
        assert all(r["peak_bytes"] is not None for r in rows)
        # would run: the GPU shape and providers of the issue
        assert "--device cuda --seqlens 4096,16384" in steps[name]["summary"]
        assert "sdpa-flash,sdpa,eager,ral-triton,ral-cuda" in steps[name]["summary"]
    assert "--tool memcheck" in steps["memcheck"]["summary"]
    # what a device run's $OUT carries back (at most 8 files): three, the raw logs tarred
    assert sorted(os.listdir(out)) == ["gpu_check.json", "gpu_check.md", "gpu_check_logs.tar.gz"]


def test_plan_cap_shares_the_budget():
    steps = [G.Step("a", 100, 10, None), G.Step("b", 100, 20, None), G.Step("c", 100, 30, None, fair=False)]
    assert G.plan_cap(steps[0], steps[1:], 1000) == 1000 - 50        # everything fits: slack to the first
    assert G.plan_cap(steps[0], steps[1:], 150) == pytest.approx(50)  # proportional share
    assert G.plan_cap(steps[2], [], 15) == 15                         # not fair: all that is left
    assert G.plan_cap(steps[0], steps[1:], 40) == steps[0].min_s      # earlier steps first: its minimum
    assert G.plan_cap(steps[0], steps[1:], 5) < steps[0].min_s        # would be skipped


@pytest.mark.parametrize("budget", [60, 200, 420, 900])
def test_simulated_plan_fits_the_budget_in_order(budget):
    plan = G.simulate_plan(G.STEPS, budget)
    assert sum(used for _, used in plan) <= budget
    ran = [used > 0 for _, used in plan]
    assert ran[:2] == [True, True] or budget < 100         # env and the build come first
    if budget >= 420:
        assert all(ran)                                     # the default budget runs every step
    if budget >= 900:
        assert all(used == s.est_s for s, (_, used) in zip(G.STEPS, plan))


def test_pytest_counts_summary_and_interrupted():
    assert G.pytest_counts("x\n===== 3 failed, 116 passed, 2 skipped in 31.2s =====\n") == dict(
        failed=3, passed=116, skipped=2)
    partial = "tests/test_cuda.py::test_a[x] PASSED [ 1%]\ntests/test_cuda.py::test_b FAILED [ 2%]\n"
    assert G.pytest_counts(partial) == dict(passed=1, failed=1)
    xdist = ("[gw0] [  1%] PASSED tests/test_cuda.py::test_a[x] \n[gw1] [  2%] PASSED tests/test_cuda.py::test_c \n"
             "[gw1] [  3%] SKIPPED tests/test_cuda.py::test_d \nFAILED tests/test_cuda.py::test_e - AssertionError\n")
    assert G.pytest_counts(xdist) == dict(passed=2, skipped=1)


def _row(p, s, status="ok", t=1.0, peak=100.0, note=""):
    return dict(provider=p, mode="full", S=s, status=status, time_s=t, peak_bytes=peak, note=note)


def test_bench_goals_verdicts():
    rows = [_row("sdpa-flash", 4096, t=1.0, peak=100), _row("eager", 4096, peak=10000),
            _row("ral-cuda", 4096, t=1.5, peak=105), _row("ral-triton", 4096, t=2.5, peak=150),
            _row("sdpa-flash", 16384), _row("eager", 16384, status="oom", t=None, peak=None),
            _row("ral-cuda", 16384, t=1.9, peak=100), _row("ral-triton", 16384, status="error", t=None)]
    goals = {(g["S"], g["provider"], g["goal"].split()[0]): g["verdict"] for g in G.bench_goals(rows, "bench-jsd-mean")}
    assert goals[(4096, "ral-cuda", "time")] == "PASS" and goals[(4096, "ral-cuda", "peak")] == "PASS"
    assert goals[(4096, "ral-cuda", "eager")] == "PASS"                       # 95x
    assert goals[(4096, "ral-triton", "time")] == "FAIL" and goals[(4096, "ral-triton", "peak")] == "FAIL"
    assert goals[(16384, "ral-cuda", "eager")] == "PASS"                      # eager OOM
    assert goals[(16384, "ral-triton", "time")] == "n/a"
    no_flash = [dict(r, status="error") if r["provider"] == "sdpa-flash" else r for r in rows]
    no_flash += [_row("sdpa", 4096, t=1.0, peak=100)]
    floor = {g["goal"] for g in G.bench_goals(no_flash, "bench-jsd-mean") if g["S"] == 4096}
    assert "time <= 2.0x sdpa" in floor                                         # torch's own pick instead
    kl = {(g["S"], g["provider"], g["goal"].split()[0]): g["verdict"] for g in G.bench_goals(rows, "bench-kl-each")}
    assert kl[(4096, "ral-cuda", "time")] == "FAIL"                            # 1.5x > 1.4x


def test_cuda_arch_and_build_command():
    assert G.cuda_arch((9, 0)) == "90a" and G.cuda_arch((8, 0)) == "80" and G.cuda_arch(None) is None
    cmd, env = G.build_command("90a")
    assert cmd[1:] == ["-m", "pip", "install", "-v", "--no-build-isolation", "--no-deps", "-e", "."]
    assert env["RAL_CUDA_ARCHS"] == "90a"


def test_time_interleaved_rotates_and_reports_warmup_apart():
    cfg = P.Config(heads=2, kv_heads=1, head_dim=16)
    res = P.time_interleaved(["sdpa", "eager"], "full", 32, cfg, repeats=4, min_time=0.0, min_repeats=3)
    for p in ("sdpa", "eager"):
        assert res[p]["status"] == "ok" and len(res[p]["times"]) == 3 and res[p]["warmup_s"] > 0
    bad = P.time_interleaved(["sdpa", "nope"], "fwd", 32, cfg, repeats=2, min_time=0.0)
    assert bad["sdpa"]["status"] == "ok" and bad["nope"]["status"] == "error"


def test_benchmarks_write_to_the_ignored_folder_by_default():
    assert bench_memory.parse_args([]).out_dir == os.path.join(HERE, "out")
    assert bench_memory.parse_args(["--out", "benchmarks/results"]).out_dir == "benchmarks/results"
    assert bench_memory.parse_args(["--out-dir", "x"]).out_dir == "x"
    assert G.parse_args([]).out.startswith(os.path.join(HERE, "out"))
    ignored = subprocess.run(["git", "check-ignore", "-q", os.path.join(HERE, "out", "x.json")], cwd=HERE)
    if ignored.returncode != 128:   # 128: not a git checkout
        assert ignored.returncode == 0, "benchmarks/out/ should be git-ignored"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_sanitize_cases_run_on_the_gpu():
    assert G.sanitize_cases("cuda", "cuda" if P.ral.backends.unavailable_reason("cuda") is None else "triton") == 0
