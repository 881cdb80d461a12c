"""compare_builds.py: this checkout against itself gives one time per tree and round and ratios that
are those times' quotients; a tree whose ral a worker did not import, or that has none, is refused.

    python -m pytest -q benchmarks/test_compare_builds.py      # ~20 s
"""

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SCRIPT = os.path.join(HERE, "compare_builds.py")

import ral  # noqa: E402
from ral.backends import compiled  # noqa: E402

pytestmark = [
    pytest.mark.skipif(compiled.import_error() is not None, reason=f"ral._C not built: {compiled.import_error()}"),
    pytest.mark.skipif(not os.path.realpath(ral.__file__).startswith(os.path.realpath(REPO) + os.sep),
                       reason="ral is not imported from this checkout (compare_builds needs an in-place build)"),
]


def run(*args, out):
    cmd = [sys.executable, SCRIPT, *args, "--seq", "128", "--threads", "1", "--calls", "1", "--no-progress",
           "--out", str(out)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def test_this_tree_against_itself(tmp_path):
    done = run(REPO, REPO, "--rounds", "2", "--mode", "full", out=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    data = json.loads((tmp_path / "compare_builds.json").read_text())
    assert data["errors"] == [] and data["mode"] == "full"
    rounds = data["threads"]["1"]["rounds"]
    assert len(rounds) == 2 and all(len(r) == 2 and all(t > 0 for t in r) for r in rounds)
    base, same = data["threads"]["1"]["summary"]
    assert base["ratios"] == [1.0, 1.0]
    assert same["ratios"] == pytest.approx([r[1] / r[0] for r in rounds])
    assert same["below_1"] == sum(r[1] < r[0] for r in rounds)
    assert "median ratio" in done.stdout and done.stdout.rstrip().endswith("compare_builds.json")


def test_a_tree_whose_ral_the_worker_did_not_import_is_refused(tmp_path):
    foreign = tmp_path / "tree"
    (foreign / "ral").mkdir(parents=True)  # no __init__.py: the installed ral wins the import
    done = run(REPO, str(foreign), "--rounds", "1", out=tmp_path)
    assert done.returncode == 1
    data = json.loads((tmp_path / "compare_builds.json").read_text())
    assert [e["tree"] for e in data["errors"]] == [str(foreign.resolve())]
    assert "not from" in data["errors"][0]["error"]
    assert data["threads"]["1"]["rounds"][0][1] is None


def test_a_tree_without_ral_is_refused(tmp_path):
    done = run(str(tmp_path), out=tmp_path)
    assert done.returncode != 0 and "not a ral source tree" in done.stderr
