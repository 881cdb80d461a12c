"""CPU cost of the policy statistics (docs/design.md, "Attention statistics"): one thread, process
time, best of `reps`, forward + backward of attention_kl (B=1, H=8, D=64, fp32, causal, jsd, mean)
with loss div + out (+ entropy + weighted mass when segments > 0).

    PYTHONPATH=. python benchmarks/bench_stats_cpu.py S SEGMENTS REPS     (SEGMENTS 0: no statistics)
    PYTHONPATH=. python benchmarks/bench_stats_cpu.py S stats REPS        (ral.ops.attention_stats, 3 segments)
    PYTHONPATH=. python benchmarks/bench_stats_cpu.py S SEGMENTS REPS fwd (the forward alone, no autograd)

Run the variants alternately, several times, and compare the best times (the machine is shared).
"""

import sys
import time

import torch

torch.set_num_threads(1)
import ral  # noqa: E402

S, what, reps = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
forward_only = sys.argv[4:] == ["fwd"]
torch.manual_seed(0)
B, H, D = 1, 8, 64
q, k, v = (torch.randn(B, H, S, D).requires_grad_(True) for _ in range(3))
q_ref, k_ref = torch.randn(B, H, S, D), torch.randn(B, H, S, D)
nseg = 3 if what == "stats" else int(what)
extra = dict(key_segments=torch.randint(0, nseg, (B, S)), num_segments=nseg) if nseg else {}


def step():
    if what == "stats":
        res = ral.ops.attention_stats(q, k, v, backend="cpu", **extra)
        return res.out.sum() + res.entropy.sum() + (res.mass * torch.arange(nseg)).sum()
    res = ral.attention_kl(q, k, v, q_ref=q_ref, k_ref=k_ref, backend="cpu", **extra)
    loss = res.div.sum() + res.out.sum()
    if nseg:
        loss = loss + res.entropy.sum() + (res.mass * torch.arange(nseg)).sum()
    return loss


best = float("inf")
for _ in range(reps):
    start = time.process_time()
    if forward_only:
        with torch.no_grad():
            step()
    else:
        step().backward()
    best = min(best, time.process_time() - start)
    q.grad = k.grad = v.grad = None
print(f"{ral.__file__} S={S} {what}{' forward' if forward_only else ''}: best {best:.3f} s")
