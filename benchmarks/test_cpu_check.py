"""cpu_check.py: a quick run with a forced second vector width writes its table, verdicts and files;
the variant check catches kernels that disagree with the installed ones; the verdicts follow the
numbers they are given.

    python -m pytest -q benchmarks/test_cpu_check.py      # ~1 min (builds the 4-lane kernels at -O3 once)
"""

import json
import os
import subprocess
import sys
import types

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import cpu_check as C  # noqa: E402
import providers as P  # noqa: E402
from ral.backends import compiled  # noqa: E402

pytestmark = pytest.mark.skipif(compiled.import_error() is not None,
                                reason=f"ral._C not built: {compiled.import_error()}")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cpu_check")
    other = 4 if compiled._C.cpu_lanes != 4 else 8
    cmd = [sys.executable, os.path.join(HERE, "cpu_check.py"), "--quick", "--seq", "192", "--lanes", str(other),
           "--threads", "1", "--repeats", "3", "--min-time", "0.01", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    return done, out, other


def test_quick_run_times_both_widths_in_every_mode(quick_run):
    done, out, other = quick_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(out / "cpu_check.json") as fh:
        data = json.load(fh)
    native = compiled._C.cpu_lanes
    assert data["lanes"] == [native, other] and data["errors"] == []
    for lanes in (native, other):
        for mode in C.MODES:
            cell = data["summary"][f"{lanes}/1/{mode}"]
            assert cell["ral_s"] > 0 and cell["sdpa_s"] > 0
            assert cell["ratio"] == pytest.approx(cell["ral_rounds"][0] / cell["sdpa_rounds"][0])
    # the variant was really the other width's build, checked against the installed kernels first
    assert data["agreement"][str(other)][0] <= C.AGREEMENT_TOL
    assert os.path.exists(data["variant_paths"][str(other)])
    verdicts = data["verdicts"]
    assert any(v.startswith(("PASS", "FAIL")) for v in verdicts)
    assert any(f"the {other}-lane build" in v for v in verdicts)
    assert (out / "cpu_check.md").exists() and (out / "cpu_check.png").exists()
    assert "ral / SDPA" in done.stdout and "wrote " in done.stdout.splitlines()[-1]


def test_worker_reports_the_width_it_ran(quick_run):
    done, out, other = quick_run
    with open(out / "cpu_check.json") as fh:
        path = json.load(fh)["variant_paths"][str(other)]
    module = C.load_variant(other, path)
    assert module.cpu_lanes == other
    wrong = 16 if other != 16 else 8
    with pytest.raises(RuntimeError, match=f"not the {wrong}-lane kernels"):
        C.load_variant(wrong, path)


def test_agreement_catches_kernels_that_disagree():
    installed = compiled._C
    same = types.SimpleNamespace(**{n: getattr(installed, n) for n in dir(installed) if not n.startswith("__")})
    assert C.agreement(same, P.Config(), seq=64) <= C.AGREEMENT_TOL
    no_backward = types.SimpleNamespace(**vars(same))
    no_backward.cpu_backward = lambda *args, **kwargs: None   # gradients stay zero
    assert C.agreement(no_backward, P.Config(), seq=64) > 0.5
    assert compiled._C is installed


def _cell(lanes, threads, mode, ral, sdpa, native=16):
    ratio = [a / b for a, b in zip(ral, sdpa)]
    return {f"{lanes}/{threads}/{mode}": dict(lanes=lanes, threads=threads, mode=mode, installed=lanes == native,
                                              ral_s=sorted(ral)[len(ral) // 2], sdpa_s=sorted(sdpa)[len(sdpa) // 2],
                                              ratio=sorted(ratio)[len(ratio) // 2], ral_rounds=ral, sdpa_rounds=sdpa,
                                              ratio_rounds=ratio)}


def test_verdicts_recommend_a_width_only_when_it_wins_every_round():
    summary = {**_cell(16, 2, "full", [1.0, 1.0, 1.0], [0.5, 0.5, 0.5]),
               **_cell(8, 2, "full", [0.8, 0.9, 0.85], [0.5, 0.5, 0.5])}
    lines = C.verdicts(summary, native=16, max_threads=2)
    assert lines[0].startswith("FAIL") and "2.00x" in lines[0]
    assert any(v.startswith("FASTER") and "RAL_CPU_LANES=8" in v for v in lines)
    summary.update(_cell(8, 2, "full", [0.8, 0.99, 0.85], [0.5, 0.5, 0.5]))   # one round within 5 %
    lines = C.verdicts(summary, native=16, max_threads=2)
    assert any(v.startswith("not faster") for v in lines)
    assert not any("RAL_CPU_LANES" in v for v in lines)


def test_verdicts_judge_the_ratio_goal_and_the_threads():
    summary = {**_cell(8, 1, "full", [1.6], [0.9], native=8), **_cell(8, 2, "full", [0.8], [0.5], native=8)}
    lines = C.verdicts(summary, native=8, max_threads=2)
    assert lines[0].startswith("PASS") and "1.60x" in lines[0]
    assert any("threads 1 -> 2: ral-cpu 2.00x faster, SDPA 1.80x faster" in v for v in lines)


def test_bad_arguments_exit_with_a_message():
    with pytest.raises(SystemExit, match="--lanes"):
        C.main(["--lanes", "12"])
    with pytest.raises(SystemExit, match="--threads"):
        C.main(["--threads", "0"])
