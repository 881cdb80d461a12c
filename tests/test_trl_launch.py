"""RALGRPOTrainer on 2 CPU processes (DDP over gloo) against one process on the same global batch
(tests/trl_launch_worker.py): the attention term's gradients are averaged across processes the way
TRL averages its own loss, so both give the same update.

The launch is ``accelerate launch --multi_gpu --num_processes 2`` with the trainer's ``use_cpu``:
``accelerate launch --cpu --num_processes 2`` (accelerate 1.15) starts ONE process unless an MPI
host file is given, which the first assertion below would catch. ``--multi_gpu`` starts torchrun,
and accelerate picks gloo for CPU processes.

Each launch trains three runs of 3 SGD steps: GRPO + RAL with loss_type "grpo" (per-sequence
means) and "dapo" (normalised by the global token count), and plain GRPO (lambda_attn = 0) as the
yardstick of how far the attention term moves the weights. SGD keeps the update linear in the
gradient, so an attention term summed (not averaged) across processes would show.
"""

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("accelerate")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_trl import saved_qwen2  # noqa: E402

from ral import backends  # noqa: E402

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "trl_launch_worker.py")
pytestmark = pytest.mark.skipif("cpu" not in backends.available(), reason="needs the cpu backend (ral._C)")


def launch(out, processes: int) -> dict:
    out.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", TRL_EXPERIMENTAL_SILENCE="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *(["--multi_gpu"] if processes > 1 else ["--cpu"]),
           "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", "0", WORKER, str(out)]
    done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-6000:]
    return {p.stem: torch.load(p) for p in out.glob("*.pt")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("trl_launch")
    saved_qwen2(root / "init")
    return launch(root / "one", 1), launch(root / "two", 2)


def params_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("name", ["grpo_ral", "dapo_ral", "grpo_plain"])
def test_two_processes_equal_one(runs, name):
    one, two = runs[0][name], runs[1][name]
    assert (one["processes"], two["processes"]) == (1, 2)
    assert len(one["logs"]) == len(two["logs"]) == 3
    torch.testing.assert_close(torch.tensor([h["loss"] for h in two["logs"]]),
                               torch.tensor([h["loss"] for h in one["logs"]]), rtol=1e-4, atol=1e-6)
    if name.endswith("_ral"):
        # ral/attn_loss is a term of the loss; ral/attn_div is a diagnostic, the token mean of each
        # micro-batch averaged over the step's micro-batches as TRL averages its own metrics, and the
        # micro-batches hold other rows with 2 processes (rows 0-3 + 8-11, not 0-7): close, not equal.
        # ral/attn_loss = lambda * sum A * div with each group's advantages summing to 0: the sum cancels,
        # so the kernels' float32 rounding, which differs between the two runs' paddings and with the
        # SIMD width, is amplified relative to it (1.8e-3 apart on an AVX2 host, the same with the
        # kernels before 2026-12-06; within 1e-3 on AVX-512 hosts); a term summed over processes
        # instead of averaged would be 2x off.
        for key, rtol in (("ral/attn_loss", 5e-3), ("ral/attn_div", 5e-2)):
            torch.testing.assert_close(torch.tensor([h[key] for h in two["logs"]]),
                                       torch.tensor([h[key] for h in one["logs"]]), rtol=rtol, atol=1e-10, msg=key)
    for k, p in one["params"].items():
        torch.testing.assert_close(two["params"][k], p, rtol=1e-5, atol=1e-6, msg=k)


def test_the_attention_term_moves_the_update(runs):
    """The agreement above is not trivial: the attention term moves the weights (GRPO + RAL minus plain
    GRPO) by far more than the 1-vs-2-process discrepancy of that move."""
    (one, two) = ({n: r[n]["params"] for n in ("grpo_ral", "grpo_plain")} for r in runs)
    assert all(h["ral/attn_loss"] > 0 for h in runs[0]["grpo_ral"]["logs"][1:2])
    move_one = {k: one["grpo_ral"][k] - one["grpo_plain"][k] for k in one["grpo_ral"]}
    move_two = {k: two["grpo_ral"][k] - two["grpo_plain"][k] for k in two["grpo_ral"]}
    moved = max(float(v.abs().max()) for v in move_one.values())
    assert moved > 1e-5, moved
    assert params_diff(move_two, move_one) < 1e-2 * moved
