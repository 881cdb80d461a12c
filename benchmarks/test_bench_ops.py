"""pytest-benchmark suite: one benchmark per provider and mode at a small shape, plus checks that
can fail (ral's out / div / gradients against eager's and SDPA's).

    python -m pytest benchmarks/test_bench_ops.py                        # timings (pytest-benchmark)
    python -m pytest benchmarks/test_bench_ops.py --benchmark-disable    # CI: each body once, < 20 s

The shape is small on purpose (CI); the real sweeps are bench_memory.py and bench_speed.py.
"""

import os
import platform
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import providers as P  # noqa: E402

CFG = P.Config(batch=1, heads=4, kv_heads=2, head_dim=32, dtype="float32", device="cpu")
SEQ = 128
CPU_PROVIDERS = ["eager", "sdpa", "ral-cpu"]   # ral-reference (the oracle) is checked below, not timed


def _skip_unless_available(provider: str, device: str = "cpu") -> None:
    if provider.startswith("ral-"):
        backend = provider[4:]
        why = P.ral.backends.unavailable_reason(backend)
        if why is not None:
            pytest.skip(f"{provider}: {why}")
        if backend == "triton" and device == "cpu":
            pytest.skip("ral-triton runs on CUDA tensors (the interpreter is covered by tests/test_triton.py)")


@pytest.mark.parametrize("mode", P.MODES)
@pytest.mark.parametrize("provider", CPU_PROVIDERS)
def test_bench_cpu(benchmark, provider, mode):
    _skip_unless_available(provider)
    fwd = P.provider_fn(provider)
    inp = P.make_inputs(CFG, SEQ)
    benchmark.group = f"cpu {mode} S={SEQ}"
    benchmark.extra_info.update(provider=provider, mode=mode, S=SEQ, **CFG.asdict())
    if mode == "fwd":
        def body():
            with torch.no_grad():
                return fwd(inp, CFG)
        out, div = benchmark(body)
    elif mode == "full":
        def body():
            P.clear_grads(inp)
            o, d = fwd(inp, CFG)
            P.backward(o, d, inp)
            return o, d
        out, div = benchmark(body)
    else:
        out, div = fwd(inp, CFG)

        def body():
            P.clear_grads(inp)
            P.backward(out, div, inp, retain_graph=True)
        benchmark(body)
        assert inp["q"].grad is not None and torch.isfinite(inp["q"].grad).all()
    assert out.shape == (CFG.batch, CFG.heads, SEQ, CFG.head_dim)
    assert torch.isfinite(out).all()
    if provider != "sdpa":
        div = div.detach()
        assert div.shape == (CFG.batch, SEQ) and torch.isfinite(div).all()
        assert float(div[:, 0].abs().max()) == 0.0          # empty policy support: the first row
        assert float(div.min()) >= -1e-6 and float(div.max()) <= 0.6932  # JSD in [0, ln 2]


def _grads(provider, inp):
    P.clear_grads(inp)
    out, div = P.provider_fn(provider)(inp, CFG)
    P.backward(out, div, inp)
    return out.detach(), None if div is None else div.detach(), [inp[n].grad.clone() for n in "qkv"]


@pytest.mark.parametrize("provider", ["ral-reference", "ral-cpu"])
def test_ral_matches_eager_and_sdpa(provider):
    """The fused op computes what the paper's eager pipeline computes (out, div and gradients)."""
    _skip_unless_available(provider)
    inp = P.make_inputs(CFG, 128, seed=1)
    e_out, e_div, e_grads = _grads("eager", inp)
    r_out, r_div, r_grads = _grads(provider, inp)
    s_out = P.forward_sdpa(inp, CFG)[0].detach()
    torch.testing.assert_close(r_out, s_out, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(r_div, e_div, atol=2e-6, rtol=1e-4)
    assert float(e_div[:, 1:].mean()) > 1e-3                # the reference differs: a real divergence
    for name, rg, eg in zip("qkv", r_grads, e_grads):
        torch.testing.assert_close(rg, eg, atol=5e-5, rtol=1e-3, msg=lambda m: f"d{name}: {m}")


def test_eager_matches_the_spec_on_a_hand_example():
    """Eager's pipeline: identical models give JSD 0; the first row (empty support) gives 0."""
    inp = P.make_inputs(CFG, 64, seed=2)
    same = dict(inp, q_ref=inp["q"].detach(), k_ref=inp["k"].detach())
    _, div = P.forward_eager(same, CFG)
    assert float(div.detach().abs().max()) < 1e-6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", P.MODES)
@pytest.mark.parametrize("provider", ["eager", "sdpa", "ral-triton", "ral-cuda"])
def test_bench_cuda(benchmark, provider, mode):
    _skip_unless_available(provider, "cuda")
    cfg = P.Config(batch=1, heads=28, kv_heads=4, head_dim=128, dtype="bfloat16", device="cuda")
    seq = 2048
    benchmark.group = f"cuda {mode} S={seq}"
    fwd = P.provider_fn(provider)
    inp = P.make_inputs(cfg, seq)
    out, div = fwd(inp, cfg)              # compile / autotune outside the benchmark
    P.backward(out, div, inp)
    if mode == "bwd":
        def body():
            P.clear_grads(inp)
            P.backward(out, div, inp, retain_graph=True)
            torch.cuda.synchronize()
    else:
        def body():
            P.clear_grads(inp)
            if mode == "fwd":
                with torch.no_grad():
                    fwd(inp, cfg)
            else:
                o, d = fwd(inp, cfg)
                P.backward(o, d, inp)
            torch.cuda.synchronize()
    benchmark(body)
    if provider.startswith("ral-"):
        e_inp = P.make_inputs(P.Config(**dict(cfg.asdict(), dtype="float32")), 256, seed=3)
        r_inp = {k: v.detach().to(torch.bfloat16).requires_grad_(v.requires_grad) if v.is_floating_point() and k != "ddiv"
                 else v for k, v in e_inp.items()}
        _, e_div = P.forward_eager(e_inp, P.Config(**dict(cfg.asdict(), dtype="float32")))
        _, r_div = fwd(r_inp, cfg)
        torch.testing.assert_close(r_div.float(), e_div.float(), atol=2e-2, rtol=5e-2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")
def test_cuda_device_without_gpu_is_a_clear_exit():
    with pytest.raises(SystemExit, match="sees no CUDA device"):
        P.pick_device("cuda")
    assert P.pick_device("auto") == "cpu"


_RSS_AFTER_FREE = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
import providers as P
if sys.argv[2] == "fixed":
    P.fixed_mmap_threshold()
def rss():
    return P._status_kib("VmRSS") * 1024
def touch_and_free(nbytes):
    t = torch.empty(nbytes // 4, dtype=torch.float32)
    t.fill_(1.0)
    del t
touch_and_free(16 << 20)   # glibc's default: freeing this raises the mmap threshold to 16 MiB
before = rss()
touch_and_free(8 << 20)    # ... so this one would come from the heap and stay resident
print(rss() - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or P._status_kib("VmRSS") is None,
                    reason="glibc on Linux only (mallopt, /proc/self/status)")
def test_fixed_mmap_threshold_returns_freed_tensors_to_the_os():
    """The memory workers' allocator setting: a freed 8 MiB tensor leaves nothing resident, so that
    a point's resident-set peak does not depend on what earlier calls left on the heap."""
    import subprocess
    out = subprocess.run([sys.executable, "-c", _RSS_AFTER_FREE, HERE, "fixed"], capture_output=True,
                         text=True, check=True).stdout
    assert int(out.strip()) < (1 << 20), out


def _topology(root, siblings: dict) -> str:
    for cpu, text in siblings.items():
        d = root / f"cpu{cpu}" / "topology"
        d.mkdir(parents=True)
        (d / "thread_siblings_list").write_text(text + "\n")
    return str(root)


def test_cpu_cores_counts_smt_siblings_once(tmp_path, monkeypatch):
    """The device line's SMT note (issue 17's question: are a VM's two vCPUs one core?)."""
    monkeypatch.setattr(P.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert P.cpu_cores(_topology(tmp_path / "smt", {0: "0-1", 1: "0-1"})) == (2, 1)
    assert P.cpu_cores(_topology(tmp_path / "two", {0: "0", 1: "1"})) == (2, 2)
    assert P.cpu_cores(str(tmp_path / "missing")) is None
    monkeypatch.setattr(P, "cpu_cores", lambda: (2, 1))
    assert "(SMT: 2 usable on 1 core)" in P.cpu_description()
    monkeypatch.setattr(P, "cpu_cores", lambda: (2, 2))
    assert "SMT" not in P.cpu_description()
