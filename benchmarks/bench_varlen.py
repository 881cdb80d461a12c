#!/usr/bin/env python
"""Packed sequences (issue 12): one ragged batch timed three ways, forward + backward.

    python benchmarks/bench_varlen.py            # CPU: 8 sequences, lengths 256..8192 (seeded); ~4 min CPU
    python benchmarks/bench_varlen.py --quick    # lengths 128..2048, < 1 min
    python benchmarks/bench_varlen.py --device cuda   # GPU: bf16, same lengths, in-process
    python benchmarks/bench_varlen.py --out benchmarks/results   # publish (default: benchmarks/out/)

Methods (same numbers, same upstream gradients; B sequences of lengths L_1..L_B, T = sum L_n):

    packed    ``ral.attention_kl_varlen`` on the (T, H, D) packed batch (one call, cu_seqlens)
    padded    ``ral.attention_kl`` on (B, H, max L, D), right-padded, with key_padding_mask and
              row_mask (padded rows carry no divergence; their dout is 0)
    per-seq   B dense ``ral.attention_kl`` calls, one per sequence (B=1, S=L_n), one after another

Each is forward + backward of ``out`` and ``div`` (jsd, heads="mean", causal by default).

Goals judged (issue 12): packed within 1.1x of the sum of the per-sequence calls; packed faster
than padded by about the padding fraction (time saved 1 - packed/padded >= 0.9 x the padding
fraction 1 - T / (B · max L)). Both judged on the process CPU time on CPU (robust to other tenants'
load: torch and ral at --threads, default 1), on the median wall time (CUDA events) on a GPU; the
other measure is printed next to it.

Time: one process (fresh on CPU) holds the three methods' inputs; one untimed warm-up call each
(``warmup_s``; it also checks that the three give the same div and gradients), then rounds of one
timed call per method in an order rotated by one each round, --repeats rounds (or until
--max-seconds); ``time_s`` is the median wall time (perf_counter; CUDA events on a GPU),
``cpu_s`` the median ``time.process_time`` of the calls.

Memory: each method's first call at the real shape runs in a fresh process (CPU; forked from a
server that has only imported torch and ral), after a tiny warm-up: resident-set peak above the
resident set once its inputs exist (providers.RssMeter), outputs and gradients included. On a GPU
``torch.cuda.max_memory_allocated`` above the inputs, in this process.

Writes <out>/<tag>.json, .csv and .png (tag bench_varlen_<device>[_quick]; <out> benchmarks/out/,
git-ignored, unless --out) and prints a table, the load average and the verdicts.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import math
import os
import random
import shlex
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import torch  # noqa: E402

import providers as P  # noqa: E402
import report  # noqa: E402
from bench_memory import Runner  # noqa: E402

METHODS = ("packed", "padded", "per-seq")
LABELS = {"packed": "packed (attention_kl_varlen)", "padded": "padded to max L (masks)",
          "per-seq": "sum of per-sequence calls"}
COLORS = {"packed": "#1f77b4", "padded": "#d62728", "per-seq": "#7f7f7f"}


def default_lengths(n: int = 8, lo: int = 256, hi: int = 8192, seed: int = 0) -> list:
    """n lengths: lo, hi and n-2 log-uniform draws between them (seeded), in a shuffled order.
    Seed 0: [1506, 256, 628, 8192, 1042, 4778, 3541, 1100] (full); --quick (128..2048):
    [528, 128, 262, 2048, 393, 1330, 1047, 411]."""
    rng = random.Random(seed)
    mid = [int(round(math.exp(rng.uniform(math.log(lo), math.log(hi))))) for _ in range(max(0, n - 2))]
    lengths = ([lo, hi] + mid)[:n]
    rng.shuffle(lengths)
    return lengths


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (cuda if available); default cpu")
    ap.add_argument("--lengths", default=None, help="comma list of sequence lengths (default: default_lengths())")
    ap.add_argument("--num-seqs", type=int, default=8, help="sequences of the seeded default list (default 8)")
    ap.add_argument("--min-len", type=int, default=None, help="default 256 (--quick 128)")
    ap.add_argument("--max-len", type=int, default=None, help="default 8192 (--quick 2048)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the lengths and of the inputs")
    ap.add_argument("--heads", type=int, default=8, help="query heads H (default 8)")
    ap.add_argument("--kv-heads", type=int, default=2, help="kv heads Hkv (default 2)")
    ap.add_argument("--head-dim", type=int, default=64, help="D (default 64)")
    P.add_problem_arguments(ap)
    ap.add_argument("--backend", default="auto", help="ral backend (default auto: cpu on CPU tensors)")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {METHODS}")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds (default 3; --quick 5)")
    ap.add_argument("--max-seconds", type=float, default=None,
                    help="stop timing rounds after this many wall seconds (at least one round runs)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch (and ral cpu) threads (default 1 on CPU: process CPU time = the work)")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory points")
    ap.add_argument("--quick", action="store_true", help="lengths 128..2048 (< 1 min)")
    report.add_output_arguments(ap, "bench_varlen")
    return ap.parse_args(argv)


def resolve(args) -> dict:
    device = P.pick_device(args.device)   # exits with a clear message when CUDA is asked for and absent
    gpu = device.startswith("cuda")
    if args.lengths:
        lengths = [int(x) for x in args.lengths.split(",")]
    else:
        lo = args.min_len or (128 if args.quick else 256)
        hi = args.max_len or (2048 if args.quick else 8192)
        lengths = default_lengths(args.num_seqs, lo, hi, args.seed)
    methods = args.methods.split(",")
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"--methods: unknown method {m!r}; choose from {METHODS}")
    return dict(device=device, lengths=lengths, heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim,
                **P.problem_options(args, device), backend=args.backend, seed=args.seed, methods=methods,
                threads=args.threads if args.threads else (None if gpu else 1),
                repeats=args.repeats or (5 if args.quick else 3), max_seconds=args.max_seconds)


# ----------------------------------------------------------------------------------------------
# Inputs and one call per method
# ----------------------------------------------------------------------------------------------

def make_inputs(cfg: dict, method: str, lengths=None) -> dict:
    """The method's tensors for the ragged batch: the same numbers for every method (generated
    packed, then padded or split). q, k, v require grad; dout, ddiv are the upstream gradients."""
    lengths = list(lengths or cfg["lengths"])
    dev, dt = cfg["device"], getattr(torch, cfg["dtype"])
    h, hkv, d = cfg["heads"], cfg["kv_heads"], cfg["head_dim"]
    total, longest = sum(lengths), max(lengths)
    gen = torch.Generator(device="cpu").manual_seed(cfg["seed"])
    each = cfg["heads_mode"] == "each"

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen) * scale
    packed = dict(q=rand(total, h, d), k=rand(total, hkv, d), v=rand(total, hkv, d), q_ref=rand(total, h, d),
                  k_ref=rand(total, hkv, d), dout=rand(total, h, d, scale=0.1),
                  ddiv=rand(*((total, h) if each else (total,))))
    starts = [sum(lengths[:n]) for n in range(len(lengths))]
    grad_names = ("q", "k", "v")

    def to(t, name):
        t = t.to(device=dev, dtype=torch.float32 if name == "ddiv" else dt).contiguous()
        return t.requires_grad_(name in grad_names)
    if method == "packed":
        inp = {name: to(t, name) for name, t in packed.items()}
        cu = torch.tensor([0] + [s + n for s, n in zip(starts, lengths)], dtype=torch.int32, device=dev)
        inp.update(cu=cu, max_len=longest)
        return inp
    if method == "padded":
        inp = {}
        for name, t in packed.items():   # (T, heads, dim) -> (B, heads, max L, dim); ddiv (T[, H]) -> (B[, H], max L)
            if name == "ddiv":
                pad = t.new_zeros((len(lengths), h, longest) if each else (len(lengths), longest))
                for n, (s, ln) in enumerate(zip(starts, lengths)):
                    pad[n, ..., :ln] = t[s:s + ln].T if each else t[s:s + ln]
            else:
                pad = t.new_zeros(len(lengths), t.shape[1], longest, t.shape[2])
                for n, (s, ln) in enumerate(zip(starts, lengths)):
                    pad[n, :, :ln] = t[s:s + ln].transpose(0, 1)
            inp[name] = to(pad, name)
        mask = torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None]
        inp["mask"] = mask.to(dev)
        return inp
    if method == "per-seq":
        seqs = []
        for s, ln in zip(starts, lengths):
            one = {}
            for name, t in packed.items():
                part = t[s:s + ln]
                part = part.T[None] if name == "ddiv" and each else part[None] if name == "ddiv" else \
                    part.transpose(0, 1)[None]
                one[name] = to(part, name)
            seqs.append(one)
        return dict(seqs=seqs)
    raise ValueError(f"unknown method {method!r}")


def _grad_tensors(inp: dict, method: str) -> list:
    return [s[n] for s in inp["seqs"] for n in ("q", "k", "v")] if method == "per-seq" else \
        [inp[n] for n in ("q", "k", "v")]


def clear_grads(inp: dict, method: str) -> None:
    for t in _grad_tensors(inp, method):
        t.grad = None


def step(inp: dict, method: str, cfg: dict) -> None:
    """One forward + backward of `method` (gradients cleared first)."""
    clear_grads(inp, method)
    kw = dict(divergence=cfg["divergence"], heads=cfg["heads_mode"], causal=cfg["causal"], backend=cfg["backend"])
    if method == "packed":
        r = P.ral.attention_kl_varlen(inp["q"], inp["k"], inp["v"], q_ref=inp["q_ref"], k_ref=inp["k_ref"],
                                      cu_seqlens_q=inp["cu"], cu_seqlens_k=inp["cu"], max_seqlen_q=inp["max_len"],
                                      max_seqlen_k=inp["max_len"], **kw)
        torch.autograd.backward([r.out, r.div], [inp["dout"], inp["ddiv"]])
    elif method == "padded":
        r = P.ral.attention_kl(inp["q"], inp["k"], inp["v"], q_ref=inp["q_ref"], k_ref=inp["k_ref"],
                               key_padding_mask=inp["mask"], row_mask=inp["mask"], **kw)
        torch.autograd.backward([r.out, r.div], [inp["dout"], inp["ddiv"]])
    else:
        for s in inp["seqs"]:
            r = P.ral.attention_kl(s["q"], s["k"], s["v"], q_ref=s["q_ref"], k_ref=s["k_ref"], **kw)
            torch.autograd.backward([r.out, r.div], [s["dout"], s["ddiv"]])


def packed_grads(inp: dict, method: str, lengths: list) -> dict:
    """dq, dk, dv of a method in the packed (T, heads, dim) layout, fp32 on CPU (to compare methods)."""
    out = {}
    for name in ("q", "k", "v"):
        if method == "packed":
            g = inp[name].grad
        elif method == "padded":
            g = torch.cat([inp[name].grad[n, :, :ln].transpose(0, 1) for n, ln in enumerate(lengths)])
        else:
            g = torch.cat([s[name].grad[0].transpose(0, 1) for s in inp["seqs"]])
        out[name] = g.detach().float().cpu()
    return out


# ----------------------------------------------------------------------------------------------
# Measurements (run in a fresh process on CPU)
# ----------------------------------------------------------------------------------------------

def _set_threads(cfg: dict) -> None:
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))


def measure_memory(method: str, cfg: dict) -> dict:
    """Extra peak of the method's first call at the real shape above its inputs, after a tiny
    warm-up call (thread pools, code). {"status", "peak_bytes", "first_call_s", "first_call_cpu_s"}."""
    _set_threads(cfg)
    try:
        tiny = make_inputs(cfg, method, [min(64, n) for n in cfg["lengths"]])
        step(tiny, method, cfg)
        del tiny
        inp = make_inputs(cfg, method)
        meter = P.meter_for(cfg["device"])
        meter.start()
        c0, t0 = time.process_time(), time.perf_counter()
        step(inp, method, cfg)
        P.sync(cfg["device"])
        first, first_cpu = time.perf_counter() - t0, time.process_time() - c0
        return dict(status="ok", peak_bytes=meter.peak(), first_call_s=first, first_call_cpu_s=first_cpu)
    except Exception as err:  # noqa: BLE001 - recorded, the run goes on
        return P._failure(err)
    finally:
        gc.collect()


def time_methods(methods: list, cfg: dict, progress=None) -> dict:
    """Median wall and CPU time of each method, interleaved (see the module docstring); also the
    largest difference of div / dq / dk / dv between the methods (from the warm-up calls)."""
    _set_threads(cfg)
    timer = P.Timer(cfg["device"])
    res, inputs, warm, steps = {}, {}, {}, {}
    t_start = time.perf_counter()
    grads = {}
    for m in methods:
        try:
            inputs[m] = make_inputs(cfg, m)
            P.sync(cfg["device"])
            t0 = time.perf_counter()
            step(inputs[m], m, cfg)
            P.sync(cfg["device"])
            warm[m] = time.perf_counter() - t0
            grads[m] = packed_grads(inputs[m], m, cfg["lengths"])
            steps[m] = True
        except Exception as err:  # noqa: BLE001
            res[m] = P._failure(err)
            inputs.pop(m, None)
    agree = {}
    base = "per-seq" if "per-seq" in grads else next(iter(grads), None)
    for m in grads:
        if m != base:
            agree[f"{m}_vs_{base}"] = {f"d{n}": float((grads[m][n] - grads[base][n]).abs().max()) for n in grads[m]}
    del grads
    wall = {m: [] for m in steps}
    cpu = {m: [] for m in steps}
    rnd, truncated = 0, False
    while rnd < cfg["repeats"] and steps:
        if cfg.get("max_seconds") is not None and rnd > 0 and time.perf_counter() - t_start > cfg["max_seconds"]:
            truncated = True
            break
        todo = list(steps)
        k = rnd % len(todo)
        for m in todo[k:] + todo[:k]:
            c0 = time.process_time()
            wall[m].append(timer(lambda: step(inputs[m], m, cfg)))
            cpu[m].append(time.process_time() - c0)
        rnd += 1
        if progress is not None:
            progress(rnd)
    for m in steps:
        res[m] = dict(status="ok", time_s=statistics.median(wall[m]), cpu_s=statistics.median(cpu[m]),
                      times=wall[m], cpu_times=cpu[m], warmup_s=warm[m],
                      note=f"stopped by --max-seconds after {len(wall[m])} rounds" if truncated else "")
    return dict(results=res, agreement=agree)


def memory_worker(conn, method: str, cfg: dict) -> None:
    try:
        res = measure_memory(method, cfg)
    except BaseException as err:  # noqa: BLE001
        res = dict(status="error", peak_bytes=None, note=f"{type(err).__name__}: {err}")
    conn.send(res)
    conn.close()


def time_worker(conn, methods: list, cfg: dict) -> None:
    try:
        res = time_methods(methods, cfg)
    except BaseException as err:  # noqa: BLE001
        res = dict(results={m: dict(status="error", note=f"{type(err).__name__}: {err}") for m in methods},
                   agreement={})
    conn.send(res)
    conn.close()


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------

def causal_pairs(lengths: list, causal: bool = True) -> int:
    """Attended (row, key) pairs of the ragged batch: sum L(L+1)/2 (causal) or sum L^2."""
    return sum(n * (n + 1) // 2 if causal else n * n for n in lengths)


def verdicts(rows: list, cfg: dict) -> tuple:
    """(summary lines, goals dict) for issue 12's two targets."""
    by = {r["provider"]: r for r in rows if r.get("status") == "ok" and r.get("time_s") is not None}
    lengths = cfg["lengths"]
    total, longest, n = sum(lengths), max(lengths), len(lengths)
    pad_frac = 1 - total / (n * longest)
    gpu = cfg["device"].startswith("cuda")
    key, other = ("time_s", "cpu_s") if gpu else ("cpu_s", "time_s")
    what = "median wall time (CUDA events)" if gpu else f"median process CPU time ({cfg['threads']} thread)"
    lines = [f"padding: B={n}, T={total} tokens, max L={longest}: padding fraction 1 - T/(B·maxL) = {pad_frac:.3f} "
             f"(a token-proportional cost predicts padded/packed = {1 / (1 - pad_frac):.2f}x; attended pairs "
             f"predict {(n * causal_pairs([longest], cfg['causal'])) / causal_pairs(lengths, cfg['causal']):.2f}x)",
             f"judged on: {what}; the other measure in brackets"]
    goals = {}
    if "packed" in by and "per-seq" in by:
        r = by["packed"][key] / by["per-seq"][key]
        r2 = by["packed"][other] / by["per-seq"][other]
        ok = r <= 1.1
        goals["packed_vs_per_seq"] = dict(ratio=r, ratio_other=r2, goal="<= 1.1", verdict="PASS" if ok else "FAIL")
        lines.append(f"packed / sum of per-sequence calls = {r:.3f}x [{r2:.3f}x] "
                     f"(goal <= 1.1x: {'PASS' if ok else 'FAIL'})")
    else:
        lines.append("packed vs per-seq: not measured")
    if "packed" in by and "padded" in by:
        sp = by["padded"][key] / by["packed"][key]
        sp2 = by["padded"][other] / by["packed"][other]
        saved = 1 - 1 / sp
        ok = saved >= 0.9 * pad_frac
        goals["packed_vs_padded"] = dict(speedup=sp, speedup_other=sp2, time_saved=saved, padding_fraction=pad_frac,
                                         goal="time saved >= 0.9 x padding fraction", verdict="PASS" if ok else "FAIL")
        lines.append(f"padded / packed = {sp:.2f}x [{sp2:.2f}x]: time saved {saved:.3f} vs padding fraction "
                     f"{pad_frac:.3f} (goal saved >= 0.9 x padding fraction: {'PASS' if ok else 'FAIL'})")
    else:
        lines.append("packed vs padded: not measured")
    return lines, goals


def table(rows: list) -> str:
    return report.run_table(rows, lambda r: r["provider"], [
        ("method", 10, None),
        ("median wall", 12, lambda r: P.fmt_time(r.get("time_s"))),
        ("median CPU", 12, lambda r: P.fmt_time(r.get("cpu_s"))),
        ("warm-up", 10, lambda r: P.fmt_time(r.get("warmup_s"))),
        ("extra peak", 12, lambda r: P.fmt_bytes(r.get("peak_bytes"))),
        ("first call", 11, lambda r: P.fmt_time(r.get("first_call_s"))),
        ("rounds", 6, lambda r: str(r.get("repeats", 0))),
    ])


def plot(rows: list, meta: dict, path: str):
    plt = report.pyplot()
    if plt is None:  # pragma: no cover
        return None
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    names = [r["provider"] for r in ok]
    x = range(len(ok))
    width = 0.38
    wall = [r.get("time_s") or 0 for r in ok]
    cpu = [r.get("cpu_s") or 0 for r in ok]
    axes[0].bar([i - width / 2 for i in x], wall, width, label="median wall", color=[COLORS[n] for n in names])
    axes[0].bar([i + width / 2 for i in x], cpu, width, label="median process CPU", color=[COLORS[n] for n in names],
                alpha=0.45, hatch="//")
    axes[0].set_ylabel("seconds per forward + backward")
    axes[0].legend(fontsize=8)
    peaks = [(r.get("peak_bytes") or 0) / P.MIB for r in ok]
    axes[1].bar(list(x), peaks, 0.6, color=[COLORS[n] for n in names])
    axes[1].set_ylabel("extra peak memory (MiB, above inputs)")
    for ax in axes:
        ax.set_xticks(list(x))
        ax.set_xticklabels([LABELS[n] for n in names], fontsize=8, rotation=10)
        ax.grid(True, axis="y", alpha=0.3)
    cfg = meta["config"]
    return report.finish_figure(
        fig, f"Ragged batch, lengths {cfg['lengths']} — H={cfg['heads']}, Hkv={cfg['kv_heads']}, D={cfg['head_dim']}, "
             f"{cfg['dtype']}, {'causal, ' if cfg['causal'] else ''}{cfg['divergence']}, heads={cfg['heads_mode']}, "
             "fwd+bwd", meta, path)


def main(argv=None):
    args = parse_args(argv)
    cfg = resolve(args)
    gpu = cfg["device"].startswith("cuda")
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    tag = args.tag or f"bench_varlen_{cfg['device'].split(':')[0]}" + ("_quick" if args.quick else "")
    methods = cfg["methods"]
    t_start = time.time()
    load_start = P.load_average()
    runner = Runner("none" if gpu else "process", cfg["threads"], cfg["repeats"], 0.0, 600.0)
    timeout = 3600.0
    try:
        from tqdm import tqdm
        bar = tqdm(total=(0 if args.no_memory else len(methods)) + cfg["repeats"], disable=args.no_progress,
                   unit="pt", dynamic_ncols=True, file=sys.stderr)
    except ImportError:  # pragma: no cover
        bar = None
    rows = {m: dict(provider=m, backend=cfg["backend"], mode="full", S=max(cfg["lengths"]), B=len(cfg["lengths"]),
                    H=cfg["heads"], Hkv=cfg["kv_heads"], D=cfg["head_dim"], dtype=cfg["dtype"], device=cfg["device"],
                    causal=cfg["causal"], divergence=cfg["divergence"], heads_mode=cfg["heads_mode"],
                    total_tokens=sum(cfg["lengths"]), status="ok", peak_bytes=None, note="", **P.versions())
            for m in methods}
    if not args.no_memory:
        for m in methods:
            if bar is not None:
                bar.set_description(f"memory {m}")
            if runner.isolate == "process":
                res = runner._isolated(memory_worker, (m, cfg), timeout,
                                       lambda status, note: dict(status=status, peak_bytes=None, note=note))
            else:
                res = measure_memory(m, cfg)
            rows[m].update(peak_bytes=res.get("peak_bytes"), first_call_s=res.get("first_call_s"),
                           first_call_cpu_s=res.get("first_call_cpu_s"))
            if res["status"] != "ok":
                rows[m].update(status=res["status"], note=res.get("note", ""))
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"{m} {P.fmt_bytes(res.get('peak_bytes'))}")
    timed_methods = [m for m in methods if rows[m]["status"] == "ok"]
    if bar is not None:
        bar.set_description(f"timing {','.join(timed_methods)} (interleaved rounds)")
    if timed_methods:
        if runner.isolate == "process":
            died = (lambda status, note: dict(results={m: dict(status=status, note=note) for m in timed_methods},
                                              agreement={}))
            timed = runner._isolated(time_worker, (timed_methods, cfg), timeout, died)
            if bar is not None:
                bar.update(cfg["repeats"])
        else:
            timed = time_methods(timed_methods, cfg, progress=(lambda _r: bar.update(1)) if bar is not None else None)
    else:
        timed = dict(results={}, agreement={})
    if bar is not None:
        bar.close()
    for m in timed_methods:
        res = timed["results"].get(m, dict(status="error", note="not timed"))
        if res["status"] != "ok":
            rows[m].update(status=res["status"], note=res.get("note", ""))
            continue
        rows[m].update(time_s=res["time_s"], cpu_s=res["cpu_s"], times=res["times"], cpu_times=res["cpu_times"],
                       repeats=len(res["times"]), warmup_s=res["warmup_s"], note=res.get("note", ""))
    rows = [rows[m] for m in methods]
    wall = time.time() - t_start
    summary, goals = verdicts(rows, cfg)
    meta = dict(
        command="python benchmarks/bench_varlen.py" + ("" if not (argv if argv is not None else sys.argv[1:]) else
                                                      " " + shlex.join(argv if argv is not None else sys.argv[1:])),
        date=datetime.datetime.now().isoformat(timespec="seconds"), config=cfg, methods=methods,
        padding_fraction=1 - sum(cfg["lengths"]) / (len(cfg["lengths"]) * max(cfg["lengths"])),
        device_description=P.device_description(cfg["device"]), cpu_count=os.cpu_count(),
        load_average_start=load_start, load_average_end=P.load_average(), wall_s=round(wall, 1),
        ral_backends_available=P.ral.backends.available(), agreement=timed.get("agreement", {}), goals=goals,
        memory_meter=("torch.cuda.max_memory_allocated above the inputs" if gpu else
                      "VmHWM (reset via /proc/self/clear_refs) above VmRSS once the inputs exist, fresh process "
                      "per method"),
        timer=("CUDA events" if gpu else "time.perf_counter") + " (time_s) and time.process_time (cpu_s)",
        timing="one process, one warm-up call per method, then rounds of one timed call per method in a rotating "
               "order; medians", **P.versions())
    print(f"\nral {meta['ral_version']}, torch {meta['torch_version']}, {meta['device_description']}")
    print(f"lengths {cfg['lengths']} (T={sum(cfg['lengths'])}); H={cfg['heads']} Hkv={cfg['kv_heads']} "
          f"D={cfg['head_dim']} {cfg['dtype']} {'causal' if cfg['causal'] else 'non-causal'} {cfg['divergence']} "
          f"heads={cfg['heads_mode']}, forward + backward; load average {load_start} -> {meta['load_average_end']}")
    print(table(rows))
    if meta["agreement"]:
        print("max |difference| of the gradients between methods: " + "; ".join(
            f"{k}: " + ", ".join(f"{n} {v:.1e}" for n, v in d.items()) for k, d in meta["agreement"].items()))
    report.publish(rows, meta, summary, args.out_dir, tag, wall,
                   plots=[] if args.no_plot else [lambda: plot(rows, meta, os.path.join(args.out_dir, f"{tag}.png"))])
    return rows


if __name__ == "__main__":
    main()
