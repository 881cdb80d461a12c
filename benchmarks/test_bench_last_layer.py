"""pytest-benchmark for bench_last_layer.py on a tiny Qwen2: one RAL step per implementation, and
the check that the paper's eager last layer and ral's integration give the same per-token JSD."""

import os
import sys

import pytest
import torch

pytest.importorskip("transformers")

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import bench_last_layer as LL  # noqa: E402


def test_eager_last_layer_matches_ral_integration():
    diff, mean_jsd = LL.check("cpu")
    assert mean_jsd > 1e-4, "the old policy should differ from the new one"
    assert diff < 1e-5, f"eager vs ral per-token JSD differ by {diff}"


@pytest.mark.parametrize("impl", LL.IMPLS)
def test_bench_ral_step_tiny(benchmark, impl):
    model = LL.build_model(2, 97, 64, torch.float32, "cpu", tiny=True)
    attn = LL.EagerLastLayer(model) if impl == "eager" else LL.RalLastLayer(model) if impl == "ral" else None
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=False)
    ids, response, adv = LL.make_batch(2, 48, 97, "cpu")
    benchmark.group = "last layer: one RAL step, tiny Qwen2"
    loss, div = benchmark(LL.ral_step, model, opt, attn, impl, ids, response, adv, 1.0)
    assert torch.isfinite(torch.tensor(loss))
    if impl == "grpo":
        assert div is None
    else:  # old policy == current policy at a step's start: JSD 0 up to rounding
        assert div is not None and abs(div) < 1e-5
