"""The memory contract (docs/design.md, "Memory"): the cpu backend allocates nothing that grows as Sq x Sk.

Each measurement runs in a fresh subprocess: inputs are allocated, the resident-set peak is
reset (/proc/self/clear_refs), forward + backward run, and the peak growth is reported. A control
run that materialises one S x S fp32 matrix shows the harness would catch such a buffer.
"""

import json
import os
import subprocess
import sys

import pytest

from ral import backends

S = 8192
SXS_BYTES = S * S * 4  # one fp32 S x S matrix: 256 MiB

SCRIPT = r"""
import gc, json, sys, torch, ral

def peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) * 1024

S, what = int(sys.argv[1]), sys.argv[2]
torch.manual_seed(0)
make = lambda: torch.randn(1, 1, S, 64)
q, k, v = (make().requires_grad_(True) for _ in range(3))
q_ref, k_ref = make(), make()
if what == "cp":  # this rank's zigzag shard (all heads) of the same problem; argv: store, rank, world
    import torch.distributed as dist
    from ral.distributed import attention_kl_cp, shard
    dist.init_process_group("gloo", init_method=f"file://{sys.argv[3]}", rank=int(sys.argv[4]),
                            world_size=int(sys.argv[5]))
    q, k, v = (shard(t.detach(), 2).requires_grad_(True) for t in (q, k, v))
    q_ref, k_ref = shard(q_ref, 2), shard(k_ref, 2)
    res = attention_kl_cp(q, k, v, q_ref=q_ref, k_ref=k_ref, seq_len=S, backend="cpu")  # warm-up at full size
    (res.div.sum() + res.out.sum()).backward()
    del res
    q.grad = k.grad = v.grad = None
    dist.barrier()
# warm up on a small problem so code loading and thread pools are not counted
small = [t[:, :, :64].detach().clone().requires_grad_(True) for t in (q, k, v)]
ral.attention_kl(*small, q_ref=q_ref[:, :, :64], k_ref=k_ref[:, :, :64], backend="cpu").div.sum().backward()
open("/proc/self/clear_refs", "w").write("5")
base = rss()
if what == "ral":
    res = ral.attention_kl(q, k, v, q_ref=q_ref, k_ref=k_ref, backend="cpu")
    (res.div.sum() + res.out.sum()).backward()
elif what == "varlen":  # the same S rows packed as two sequences (S/4 and 3S/4) of one (T, H, D) batch
    packed = [t[0].transpose(0, 1) for t in (q, k, v, q_ref, k_ref)]
    cu = torch.tensor([0, S // 4, S], dtype=torch.int32)
    res = ral.ops.attention_kl_varlen(*packed[:3], q_ref=packed[3], k_ref=packed[4], cu_seqlens_q=cu,
                                      cu_seqlens_k=cu, max_seqlen_q=S, max_seqlen_k=S, backend="cpu")
    (res.div.sum() + res.out.sum()).backward()
elif what == "stats":  # with the policy statistics: entropy and the mass on 8 key segments
    segments = torch.arange(S) % 8
    res = ral.attention_kl(q, k, v, q_ref=q_ref, k_ref=k_ref, key_segments=segments[None], num_segments=8,
                           backend="cpu")
    (res.div.sum() + res.out.sum() + res.entropy.sum() + res.mass[..., 3].sum()).backward()
elif what == "cp":
    res = attention_kl_cp(q, k, v, q_ref=q_ref, k_ref=k_ref, seq_len=S, backend="cpu")
    (res.div.sum() + res.out.sum()).backward()
    dist.barrier()
elif what.startswith("forward:"):  # forward only, the score cache's budget (bytes) after the colon
    from ral.backends import cpu as cpu_backend
    cpu_backend.SCORE_CACHE_BYTES = int(what.split(":")[1])
    with torch.no_grad():
        res = ral.attention_kl(q, k, v, q_ref=q_ref, k_ref=k_ref, backend="cpu")
else:  # control: one materialised S x S score matrix
    scores = q.detach()[0, 0] @ k.detach()[0, 0].T
    del scores
print(json.dumps({"growth": peak() - base}))
if what == "cp":  # free what holds the group (the result's graph, its gathers) and destroy the group now: left to
    del res        # interpreter exit, after the other rank is gone, they can abort it ("terminate called ...";
    gc.collect()   # pytorch #65231; seen once in a full suite with torch 2.11, rank 1)
    dist.destroy_process_group()
"""


def measure(what: str) -> int:
    env = dict(os.environ, OMP_NUM_THREADS="2")
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(S), what], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])["growth"]


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc to read the RSS peak")
def test_cpu_backend_never_holds_an_s_by_s_buffer():
    assert backends.unavailable_reason("cpu") is None, backends.unavailable_reason("cpu")
    control = measure("control")
    assert control >= 0.9 * SXS_BYTES, f"the harness missed a materialised S x S matrix ({control} bytes)"
    growth = measure("ral")
    # outputs + gradients + stats + scratch are O(S * D): a few MiB; one S x S fp32 matrix is 256 MiB
    assert growth < SXS_BYTES / 8, f"forward + backward grew the RSS peak by {growth / 2**20:.1f} MiB at S={S}"


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc to read the RSS peak")
def test_cpu_forward_score_cache_stays_within_its_budget():
    """The forward's score cache (ral.backends.cpu.SCORE_CACHE_BYTES) is bounded scratch: against the
    same forward without it, a 4 MiB budget adds at most 4 MiB to the peak, an unlimited one the whole
    cache, 2 threads x 128 key tiles x (H + Hr = 2) x 128 rows x 64 keys x 4 B = 16 MiB, and no more."""
    assert backends.unavailable_reason("cpu") is None, backends.unavailable_reason("cpu")
    mib = 1 << 20
    whole = 2 * (S // 64) * 2 * 128 * 64 * 4
    none, small, unlimited = (measure(f"forward:{budget}") for budget in (0, 4 * mib, 1 << 40))
    slack = 3 * mib  # resident-set granularity (2 MiB huge pages) and allocator noise
    assert small - none <= 4 * mib + slack, (none, small)
    assert 0.8 * whole <= unlimited - none <= whole + slack, (none, unlimited, whole)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc to read the RSS peak")
def test_context_parallel_rank_holds_its_rows_and_the_gathered_keys(tmp_path):
    """ral.distributed.attention_kl_cp on 2 gloo processes: each rank's peak growth over forward +
    backward is O(S/P * H * D) for its rows plus O(S * Hkv * D) for the gathered k, v, k_ref and their
    gradients before the reduce-scatter (a few MiB here), never its S/P x S block of scores (128 MiB)."""
    assert backends.unavailable_reason("cpu") is None, backends.unavailable_reason("cpu")
    world, store = 2, tmp_path / "store"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ranks = [subprocess.Popen([sys.executable, "-c", SCRIPT, str(S), "cp", str(store), str(r), str(world)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for r in range(world)]
    outs = [p.communicate(timeout=600) for p in ranks]
    assert all(p.returncode == 0 for p in ranks), [(p.returncode, out[-500:], err[-3000:])
                                                   for p, (out, err) in zip(ranks, outs)]
    growth = [json.loads(out.strip().splitlines()[-1])["growth"] for out, _ in outs]
    gathered = 3 * S * 64 * 4                      # k, v, k_ref of the whole sequence (fp32, one kv head)
    assert max(growth) < 4 * gathered + SXS_BYTES / 16, (
        f"per-rank RSS peak growth {[f'{g / 2**20:.1f} MiB' for g in growth]} at S={S}, P={world}")


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc to read the RSS peak")
def test_cpu_varlen_never_holds_a_t_by_t_buffer():
    """Packed sequences: nothing grows as T^2 or max_seqlen^2 (T = max_seqlen_k = S here)."""
    assert backends.unavailable_reason("cpu") is None, backends.unavailable_reason("cpu")
    growth = measure("varlen")
    assert growth < SXS_BYTES / 8, f"varlen forward + backward grew the RSS peak by {growth / 2**20:.1f} MiB at T={S}"
