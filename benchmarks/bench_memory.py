#!/usr/bin/env python
"""The main job: peak memory (and time) of the final-layer attention + attention-divergence,
ral against the paper's eager attention and against SDPA, swept over the sequence length.

    python benchmarks/bench_memory.py            # CPU: S = 512..8192, fwd / bwd / full, ~3 min
    python benchmarks/bench_memory.py --quick    # S = 256..1024, full only, < 30 s
    python benchmarks/bench_memory.py --device cuda   # GPU: S = 1k..32k, bf16

Providers: ``eager`` (materialise both models' attention, average heads, drop self, renormalise,
JSD, backward), ``sdpa`` (torch SDPA, output only: the floor; ``sdpa-flash`` forces its flash
kernel), and ``ral-<backend>`` for every ral kernel backend this machine has (see providers.py).

Memory: each CPU point runs in a fresh process (forked from a server that has only imported torch
and ral): its resident-set peak above the resident set once the inputs exist is the point's
memory, and the time of that first call (first-touch page faults included) is kept apart as
``first_call_s``. On GPU, points run in this process and memory is
``torch.cuda.max_memory_allocated`` after a reset, above the inputs.

Time: per (mode, S), one process (fresh on CPU) times every provider that passed its memory
point, interleaved: one warm-up call each (``warmup_s``), then rounds of one timed call per
provider in a rotating order (CUDA events on a GPU), at least --min-repeats, until --min-time or
--repeats; ``time_s`` is the median. Machine noise that drifts over seconds then hits every
provider alike instead of whichever ran during it.

A point that runs out of memory, or that is predicted (from S^2 and the smaller points) to exceed
``--max-gb``, ``--point-budget`` seconds or what is left of ``--budget``, is recorded as
OOM / SKIP and the sweep goes on.

Writes <out>/<tag>.json, .csv, _memory.png and _time.png (tag: bench_memory_<device>, with a _quick
suffix for --quick; <out> is benchmarks/out/, git-ignored, unless --out says otherwise:
``--out benchmarks/results`` publishes) and prints a table and the goal ratios at S=4096 (CPU) or
S=4k/16k (GPU).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import math
import os
import shlex
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import torch  # noqa: E402

import providers as P  # noqa: E402
import report  # noqa: E402

CPU_SEQS = [512, 1024, 2048, 4096, 8192]
GPU_SEQS = [1024, 2048, 4096, 8192, 16384, 32768]
QUICK_CPU_SEQS = [256, 512, 1024]
QUICK_GPU_SEQS = [1024, 4096, 16384]
QUADRATIC_MEMORY = ("eager", "ral-reference")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda if available)")
    ap.add_argument("--providers", default=None,
                    help="comma list of eager, sdpa, ral-cpu, ral-triton, ral-cuda, ral-reference "
                         "(default: eager, sdpa and every ral kernel backend available here)")
    ap.add_argument("--modes", default=None, help="comma list of fwd, bwd, full (default all; --quick: full)")
    ap.add_argument("--seqlens", default=None,
                    help=f"comma list (default CPU {CPU_SEQS}, GPU {GPU_SEQS})")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=None, help="query heads H (default CPU 8, GPU 28)")
    ap.add_argument("--kv-heads", type=int, default=None, help="kv heads Hkv (default CPU = H, GPU 4)")
    ap.add_argument("--head-dim", type=int, default=None, help="D (default CPU 64, GPU 128)")
    P.add_problem_arguments(ap)
    ap.add_argument("--repeats", type=int, default=None,
                    help="at most this many timed repeats per point (default CPU 5, GPU 25)")
    ap.add_argument("--min-time", type=float, default=None,
                    help="stop repeating once this many seconds were timed (default 1.0; --quick 0.2)")
    ap.add_argument("--max-gb", type=float, default=None,
                    help="skip a point predicted to need more (default CPU min(8, 60%% of MemAvailable); "
                         "GPU 4x the device's memory, so that points really run out of memory there)")
    ap.add_argument("--point-budget", type=float, default=None,
                    help="skip a point predicted to take longer, in s (default CPU 40, GPU 120)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per point (default torch's)")
    ap.add_argument("--isolate", default=None, choices=["process", "none"],
                    help="fresh process per point (default on CPU) or all in this process (default on GPU)")
    ap.add_argument("--metric", default="memory", choices=["memory", "speed"],
                    help="memory: peak + time, a fresh process per point (CPU); speed: time and TFLOP/s only, "
                         "in this process (what bench_speed.py runs)")
    ap.add_argument("--quick", action="store_true", help="a small sweep in under 30 s")
    ap.add_argument("--summary-seq", type=int, default=4096, help="S of the CPU goal ratios")
    ap.add_argument("--min-repeats", type=int, default=3,
                    help="timed repeats per point before --min-time may stop it (default 3)")
    ap.add_argument("--budget", type=float, default=None,
                    help="whole-sweep wall budget in s: points predicted past it are SKIP (default: none)")
    report.add_output_arguments(ap, "bench_memory")
    return ap.parse_args(argv)


def mem_available() -> float:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 16 * P.GIB


def resolve(args):
    device = P.pick_device(args.device)
    gpu = device.startswith("cuda")
    heads = args.heads or (28 if gpu else 8)
    kv_heads = args.kv_heads or (4 if gpu else heads)
    head_dim = args.head_dim or (128 if gpu else 64)
    cfg = P.Config(batch=args.batch, heads=heads, kv_heads=kv_heads, head_dim=head_dim, device=device,
                   **P.problem_options(args, device))
    providers = args.providers.split(",") if args.providers else P.default_providers(device)
    modes = args.modes.split(",") if args.modes else (["full"] if args.quick else list(P.MODES))
    for m in modes:
        if m not in P.MODES:
            raise SystemExit(f"--modes: unknown mode {m!r}; choose from {P.MODES}")
    if args.seqlens:
        seqs = [int(s) for s in args.seqlens.split(",")]
    else:
        seqs = (QUICK_GPU_SEQS if gpu else QUICK_CPU_SEQS) if args.quick else (GPU_SEQS if gpu else CPU_SEQS)
    if args.max_gb is not None:
        max_bytes = args.max_gb * P.GIB
    elif gpu:  # on a GPU an OOM is cheap and clean: let points really run out (4x: only absurd ones skip)
        max_bytes = 4 * torch.cuda.get_device_properties(torch.device(device)).total_memory
    else:
        max_bytes = min(8 * P.GIB, 0.6 * mem_available())
    budget = args.point_budget or (120.0 if gpu else (10.0 if args.quick else 40.0))
    min_time = args.min_time if args.min_time is not None else (0.2 if args.quick else 1.0)
    if args.repeats is None:
        args.repeats = 25 if gpu else 5
    isolate = args.isolate or ("none" if gpu or args.metric == "speed" else "process")
    tag = args.tag or f"bench_{args.metric}_{device.split(':')[0]}" + ("_quick" if args.quick else "")
    return cfg, providers, modes, sorted(seqs), max_bytes, budget, min_time, isolate, tag


class Runner:
    """Measures points: memory in fresh processes (forkserver: only torch and ral imported
    beforehand) or in this process; time in one process per (mode, S), providers interleaved."""

    def __init__(self, isolate: str, threads, repeats: int, min_time: float, budget: float,
                 measure_memory: bool = True, min_repeats: int = 3):
        self.isolate = isolate
        self.measure_memory = measure_memory
        self.opts = dict(threads=threads, repeats=repeats, min_time=min_time, min_repeats=min_repeats)
        self.timeout = max(120.0, 4 * budget)
        self.ctx = None
        if isolate == "process":
            import multiprocessing as mp
            method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
            self.ctx = mp.get_context(method)
            if method == "forkserver":
                self.ctx.set_forkserver_preload(["torch", "ral", "providers"])

    def _in_process(self, fn, *args, **kw):
        if self.opts["threads"]:
            torch.set_num_threads(self.opts["threads"])
        res = fn(*args, **kw)
        gc.collect()
        return res

    def _isolated(self, target, args, timeout: float, on_death):
        parent, child = self.ctx.Pipe(duplex=False)
        proc = self.ctx.Process(target=target, args=(child, *args))
        proc.start()
        child.close()
        res = None
        if parent.poll(timeout):
            try:
                res = parent.recv()
            except EOFError:
                res = None
        else:
            proc.kill()
            proc.join()
            return on_death("timeout", f"killed after {timeout:.0f} s")
        proc.join()
        if res is None:  # died without answering: the OOM killer (-9) or a crash
            status = "oom" if proc.exitcode in (-9, 137) else "error"
            return on_death(status, f"worker exited with {proc.exitcode} (killed: out of memory?)")
        return res

    def memory(self, provider: str, mode: str, seq: int, cfg: P.Config) -> dict:
        """The point's extra peak and the time of that first call (measure_peak)."""
        if self.isolate != "process":
            return self._in_process(P.measure_peak, provider, mode, seq, cfg)
        return self._isolated(P.worker, (provider, mode, seq, cfg.asdict(), self.opts), self.timeout,
                              lambda status, note: dict(status=status, peak_bytes=None, note=note))

    def times(self, providers: list, mode: str, seq: int, cfg: P.Config, max_seconds=None) -> dict:
        """Median times of `providers` at (mode, S), interleaved in one process (time_interleaved).
        If that process dies (out of memory with every provider's state alive), each provider is
        timed alone in its own process, and its note says so."""
        if not providers:
            return {}
        kw = dict(repeats=self.opts["repeats"], min_time=self.opts["min_time"],
                  min_repeats=self.opts["min_repeats"], max_seconds=max_seconds)
        if self.isolate != "process":
            return self._in_process(P.time_interleaved, providers, mode, seq, cfg, **kw)
        opts = dict(self.opts, max_seconds=max_seconds)
        timeout = self.timeout * len(providers)

        def died(status, note):
            return {p: dict(status=status, time_s=None, times=[], note=note) for p in providers}
        res = self._isolated(P.time_worker, (providers, mode, seq, cfg.asdict(), opts), timeout, died)
        if len(providers) > 1 and all(r["status"] != "ok" for r in res.values()):
            first = next(iter(res.values()))["note"]
            res = {}
            for p in providers:
                one = self._isolated(P.time_worker, ([p], mode, seq, cfg.asdict(), opts), self.timeout, died)[p]
                one["note"] = (one.get("note") or "") + f" (timed alone: the interleaved group failed: {first})"
                res[p] = one
        return res


def expected_runs(t: float, repeats: int, min_time: float, min_repeats: int = 3) -> float:
    """Calls a point makes: the memory call, the timing warm-up, then timed repeats (at least
    min(min_repeats, repeats), more until min_time is timed, at most repeats)."""
    cap = max(1, repeats)
    timed = min(cap, max(min(min_repeats, cap), math.ceil(min_time / max(t, 1e-9))))
    return 2 + timed


def predict(history: list, provider: str, mode: str, seq: int, cfg: P.Config):
    """(bytes, seconds per run) predicted for the point from the largest smaller measured point."""
    a_priori = P.predicted_bytes(provider, mode, seq, cfg)
    if not history:
        return a_priori, None
    s0, peak0, t0 = history[-1]
    ratio = seq / s0
    mem = a_priori
    if peak0:
        mem = max(peak0 * ratio ** (2 if provider in QUADRATIC_MEMORY else 1), 0.0)
        if provider in QUADRATIC_MEMORY:
            mem = max(mem, a_priori)
    return mem, t0 * ratio ** 2 if t0 else None


def sweep(args) -> tuple:
    """Every (mode, S): first each provider's memory point (fresh process on CPU), then one timing
    group of the providers that ran, interleaved (Runner.times). Points predicted over --max-gb,
    --point-budget or what is left of --budget are SKIP; a provider that failed at a smaller S is
    not tried at larger ones."""
    cfg, providers, modes, seqs, max_bytes, budget, min_time, isolate, tag = resolve(args)
    measure_memory = args.metric == "memory"
    runner = Runner(isolate, args.threads, args.repeats, min_time, budget, measure_memory=measure_memory,
                    min_repeats=args.min_repeats)
    rows = []
    points = [(m, s, p) for m in modes for s in seqs for p in providers]
    try:
        from tqdm import tqdm
        bar = tqdm(total=len(points), disable=args.no_progress, unit="pt", dynamic_ncols=True, file=sys.stderr)
    except ImportError:  # pragma: no cover
        bar = None
    history, failed = {}, {}
    t_start = time.perf_counter()

    def left():
        return None if args.budget is None else args.budget - (time.perf_counter() - t_start)
    for mode in modes:
        for s in seqs:
            group, group_rows = [], {}
            for p in providers:
                key = (p, mode)
                if bar is not None:
                    bar.set_description(f"{p} {mode} S={s}")
                row = dict(provider=p, backend=P.backend_label(p, cfg.device), mode=mode, S=s, B=cfg.batch,
                           H=cfg.heads, Hkv=cfg.kv_heads, D=cfg.head_dim, dtype=cfg.dtype, device=cfg.device,
                           causal=cfg.causal, divergence=cfg.divergence, heads_mode=cfg.heads_mode,
                           **P.versions())
                mem, t = predict(history.get(key, []), p, mode, s, cfg)
                runs = None if t is None else t * expected_runs(t, args.repeats, min_time, args.min_repeats)
                remaining = left()
                if key in failed:
                    res = dict(status="skip", note=f"a smaller S was {failed[key]}")
                elif mem > max_bytes:
                    res = dict(status="skip", note=f"predicted {P.fmt_bytes(mem)} > --max-gb {max_bytes / P.GIB:.1f}")
                elif runs is not None and runs > budget:
                    res = dict(status="skip", note=f"predicted {runs:.0f} s > --point-budget {budget:.0f} s")
                elif remaining is not None and (remaining <= 0 or (runs is not None and runs > remaining)):
                    res = dict(status="skip", note=f"over --budget {args.budget:.0f} s ({max(remaining, 0):.0f} s left"
                                                   + (f", predicted {runs:.0f} s)" if runs is not None else ")"))
                elif measure_memory:
                    res = runner.memory(p, mode, s, cfg)
                else:
                    res = dict(status="ok")
                row.update(status=res["status"], peak_bytes=res.get("peak_bytes"), time_s=None, repeats=0, times=[],
                           first_call_s=res.get("first_call_s"), warmup_s=None, note=res.get("note", ""))
                if res["status"] == "ok":
                    group.append(p)
                else:
                    failed.setdefault(key, f"{res['status'].upper()} at S={s}")
                group_rows[p] = row
                rows.append(row)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix_str(f"{res['status']} {P.fmt_bytes(row['peak_bytes'])}")
            if bar is not None and group:
                bar.set_description(f"timing {mode} S={s}: {','.join(group)}")
            remaining = left()
            timed = runner.times(group, mode, s, cfg, max_seconds=None if remaining is None else max(remaining, 1.0))
            for p in group:
                row, res = group_rows[p], timed.get(p, dict(status="error", note="not timed"))
                if res["status"] != "ok":
                    row.update(status=res["status"], note=res.get("note", ""))
                    failed.setdefault((p, mode), f"{res['status'].upper()} at S={s}")
                    continue
                row.update(time_s=res["time_s"], times=res["times"], repeats=len(res["times"]),
                           warmup_s=res.get("warmup_s"), note=res.get("note", ""))
                history.setdefault((p, mode), []).append((s, row["peak_bytes"], row["time_s"]))
                fa = P.attention_flops(mode, s, cfg)
                extra = P.divergence_flops(mode, s, cfg) if p.startswith("ral-") else 0.0
                row["tflops_attn"] = fa / row["time_s"] / 1e12
                row["tflops_total"] = (fa + extra) / row["time_s"] / 1e12
            if bar is not None and group:
                bar.set_postfix_str(" ".join(f"{p}={P.fmt_time(group_rows[p]['time_s'])}" for p in group))
    if bar is not None:
        bar.close()
    return rows, cfg, providers, modes, tag, dict(max_bytes=max_bytes, point_budget_s=budget, min_time_s=min_time,
                                                   repeats=args.repeats, min_repeats=args.min_repeats,
                                                   budget_s=args.budget, isolate=isolate,
                                                   timing="interleaved: per (mode, S) one process, one warm-up "
                                                          "call per provider, then rounds of one timed call per "
                                                          "provider in a rotating order; median")


def main(argv=None):
    args = parse_args(argv)
    if args.threads:   # the workers set it too; here it makes the printed description right
        torch.set_num_threads(args.threads)
    t_start = time.time()
    load_start = P.load_average()
    rows, cfg, providers, modes, tag, run_opts = sweep(args)
    wall = time.time() - t_start
    gpu = cfg.device.startswith("cuda")
    seqs = sorted({r["S"] for r in rows})
    summary_seq = args.summary_seq
    if summary_seq not in seqs:  # e.g. --quick: the largest S where eager, sdpa and a ral backend all ran
        full = [r for r in rows if r["mode"] == "full" and r["status"] == "ok"]
        common = [s for s in seqs if {"eager", report.floor_provider(rows)} <= {r["provider"] for r in full if r["S"] == s}
                  and any(r["provider"].startswith("ral-") for r in full if r["S"] == s)]
        summary_seq = common[-1] if common else seqs[-1]
    summary = ((report.summary_gpu(rows, metric=args.metric, cfg=cfg) if gpu else [])
               + report.summary_cpu(rows, seq=summary_seq, metric=args.metric))
    meta = dict(
        command=f"python benchmarks/{os.path.basename(sys.argv[0]) or 'bench_memory.py'}"
                + ("" if not sys.argv[1:] else " " + shlex.join(sys.argv[1:])), metric=args.metric,
        date=datetime.datetime.now().isoformat(timespec="seconds"), config=cfg.asdict(), providers=providers,
        modes=modes, device_description=P.device_description(cfg.device), cpu_count=os.cpu_count(),
        usable_cpus_and_cores=P.cpu_cores(),
        load_average_start=load_start, load_average_end=P.load_average(), wall_s=round(wall, 1),
        ral_backends_available=P.ral.backends.available(), memory_meter=None if args.metric == "speed" else (
            "torch.cuda.max_memory_allocated above the inputs" if gpu else
            "VmHWM (reset via /proc/self/clear_refs) above VmRSS once the inputs exist, "
            + ("fresh process per point, glibc's mmap threshold fixed at 1 MiB there (providers.fixed_mmap_threshold)"
               if run_opts["isolate"] == "process" else "in this process")),
        timer="CUDA events" if gpu else "time.perf_counter",
        flop_count=("FlashAttention's: 4*B*H*S*S*D fwd, x2.5 bwd, halved causal (tflops_attn); tflops_total "
                    "adds the divergence's score products for ral (providers.divergence_flops)"),
        **run_opts, **P.versions())
    print(f"\nral {meta['ral_version']}, torch {meta['torch_version']}, {meta['device_description']}; "
          f"ral backends here: {meta['ral_backends_available']}")
    print(f"B={cfg.batch} H={cfg.heads} Hkv={cfg.kv_heads} D={cfg.head_dim} {cfg.dtype} "
          f"{'causal' if cfg.causal else 'non-causal'} {cfg.divergence} heads={cfg.heads_mode}; "
          f"load average {load_start} -> {meta['load_average_end']}")
    busy = [la for la in (load_start or [])[:1] + (meta["load_average_end"] or [])[:1] if la > (os.cpu_count() or 1)]
    if busy and not gpu:
        print(f"warning: load average {max(busy):.1f} on {os.cpu_count()} CPUs: other processes competed for the "
              "cores during this run (torch's threads wait on descheduled peers); its times are unreliable, "
              "rerun on a quiet machine" + ("" if args.threads == 1 else " or with --threads 1"))
    print(report.table(rows, providers, modes, args.metric))
    skipped = [r for r in rows if r["status"] != "ok"]
    if skipped:
        print("\nnot measured:")
        for r in skipped:
            print(f"  {r['provider']:>14} {r['mode']:>4} S={r['S']:<6} {r['status'].upper()}: {r['note']}")
    metrics = () if args.no_plot else (("memory", "time") if args.metric == "memory" else ("time", "tflops"))
    report.publish(rows, meta, summary, args.out_dir, tag, wall, plots=[
        (lambda m=m: report.plot(rows, meta, os.path.join(args.out_dir, f"{tag}_{m}.png"), m, modes, providers))
        for m in metrics])
    return rows


if __name__ == "__main__":
    main()
