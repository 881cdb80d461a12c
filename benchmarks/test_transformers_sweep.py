"""transformers_sweep.py: a short sweep writes its rows and table, tells an equal architecture from a
refused one, and a chosen layer that changes the logits is reported as DIFFERS (exit 1).

    python -m pytest -q benchmarks/test_transformers_sweep.py      # ~10 s
"""

import json
import os
import sys

import pytest

pytest.importorskip("transformers")
HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import transformers_sweep as S  # noqa: E402


def test_sweep_rows_and_table(tmp_path):
    assert S.main(["--out", str(tmp_path), "--models", "llama,bert,no_such_model"]) == 0
    rows = {r["model"]: r for r in map(json.loads, open(tmp_path / "sweep.jsonl"))}
    assert rows["llama"]["verdict"] == "equal" and rows["llama"]["dtype"] == "float64"
    assert set(rows["llama"]["layers"]) == {"0", "1"} and max(rows["llama"]["layers"].values()) <= 1e-9
    assert rows["bert"]["verdict"] == "no causal decoder attention"
    assert rows["no_such_model"]["verdict"] == "not run"
    assert "| llama | float64 | equal |" in open(tmp_path / "sweep.md").read()


def test_a_layer_that_changes_the_logits_differs(tmp_path, monkeypatch):
    """The check has teeth: with the chosen layer's attention scaled wrongly, llama DIFFERS."""
    from ral.integrations import transformers as T
    original = T.AttentionPolicy._attend

    def wrong_scale(self, slot, module, query, key, value, scaling, kwargs, layer_mask=None):
        return original(self, slot, module, query, key, value, 2.0 * scaling, kwargs, layer_mask)

    monkeypatch.setattr(T.AttentionPolicy, "_attend", wrong_scale)
    assert S.main(["--out", str(tmp_path), "--models", "llama"]) == 1
    row = json.loads(open(tmp_path / "sweep.jsonl").readline())
    assert row["verdict"] == "DIFFERS" and min(row["layers"].values()) > 1e-3
