"""bench_varlen.py and bench_cp.py on tiny sizes, each in a subprocess (side by side), and the JSON
they write: the packed / padded / per-seq rows with times and memory, the methods' gradients
agreeing, the 2-rank context-parallel row with per-rank CPU times and memory."""

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

pytest.importorskip("torch")


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _start(script, args, out):
    cmd = [sys.executable, os.path.join(HERE, script), *args, "--out", str(out), "--no-progress", "--no-plot"]
    return subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc, timeout=300):
    try:
        text, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        text, _ = proc.communicate()
        pytest.fail(f"timed out:\n{text[-3000:]}")
    assert proc.returncode == 0, text[-3000:]
    return text


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import ral.backends
    if ral.backends.unavailable_reason("cpu") is not None:
        pytest.skip("ral._C (the cpu backend) is not built")
    out = tmp_path_factory.mktemp("bench_varlen_cp")
    varlen = _start("bench_varlen.py", ["--lengths", "40,7,96", "--heads", "4", "--kv-heads", "2", "--head-dim", "16",
                                        "--repeats", "2", "--tag", "varlen"], out)
    cp = _start("bench_cp.py", ["--seqlen", "96", "--ranks", "2", "--layouts", "zigzag", "--heads", "4",
                                "--kv-heads", "2", "--head-dim", "16", "--repeats", "2", "--tag", "cp"], out)
    text_varlen, text_cp = _finish(varlen), _finish(cp)
    with open(out / "varlen.json") as fh:
        varlen_json = json.load(fh)
    with open(out / "cp.json") as fh:
        cp_json = json.load(fh)
    return dict(varlen=varlen_json, cp=cp_json, text_varlen=text_varlen, text_cp=text_cp, out=out)


def test_varlen_json(runs):
    res = runs["varlen"]
    rows = {r["provider"]: r for r in res["rows"]}
    assert set(rows) == {"packed", "padded", "per-seq"}
    for name, r in rows.items():
        assert r["status"] == "ok", (name, r)
        assert r["time_s"] > 0 and r["cpu_s"] > 0 and r["repeats"] == 2, r
        assert r["peak_bytes"] is not None and r["peak_bytes"] > 0, r
        assert r["total_tokens"] == 143 and r["S"] == 96 and r["B"] == 3
    meta = res["meta"]
    assert meta["config"]["lengths"] == [40, 7, 96] and meta["load_average_start"] is not None
    assert abs(meta["padding_fraction"] - (1 - 143 / 288)) < 1e-9
    for pair, diffs in meta["agreement"].items():   # the three methods compute the same gradients
        assert all(d < 1e-4 for d in diffs.values()), (pair, diffs)
    assert set(meta["goals"]) == {"packed_vs_per_seq", "packed_vs_padded"}
    assert all(g["verdict"] in ("PASS", "FAIL") for g in meta["goals"].values())
    assert any("padding fraction" in line for line in res["summary"])
    assert os.path.exists(runs["out"] / "varlen.csv")


def test_cp_json(runs):
    res = runs["cp"]
    rows = {(r["ranks"], r["layout"]): r for r in res["rows"]}
    assert set(rows) == {(2, "zigzag")}
    two = rows[(2, "zigzag")]
    for r in rows.values():
        assert r["status"] == "ok", r
        assert r["time_s"] > 0 and r["repeats"] == 2
        assert len(r["cpu_s_per_rank"]) == r["ranks"] and all(c > 0 for c in r["cpu_s_per_rank"])
        assert len(r["peak_rss_growth_per_rank"]) == r["ranks"]
        assert len(r["tiles"]) == r["ranks"]
    assert len(two["times_per_rank"]) == 2            # both ranks ran and timed every round
    assert two["tiles"][0] == two["tiles"][1]          # zigzag balances the causal tiles
    assert res["meta"]["config"]["seqlen"] == 96 and res["meta"]["load_average_start"] is not None


@pytest.mark.parametrize("script", ["bench_varlen", "bench_cp"])
def test_cuda_path_exits_clearly_without_gpu(script):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: --device cuda would run")
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    module = __import__(script)
    with pytest.raises(SystemExit, match="sees no CUDA device"):
        module.main(["--device", "cuda", "--no-progress", "--out", os.devnull])
