#!/usr/bin/env python
"""Context parallelism (issue 14): ``ral.distributed.attention_kl_cp`` over 1, 2, 4 ranks, forward + backward.

    python benchmarks/bench_cp.py                 # CPU: gloo, S=8192, ranks 1,2,4, zigzag + contiguous
    python benchmarks/bench_cp.py --quick         # S=1024, ranks 1,2 (< 1 min)
    python benchmarks/bench_cp.py --device cuda   # nccl, one GPU per rank (ranks up to the GPU count)
    python benchmarks/bench_cp.py --out benchmarks/results   # publish (default: benchmarks/out/)

One sequence of S positions (B=1, H=8, Hkv=2, D=64, fp32 on CPU, causal, jsd, heads="mean"), split
over P ranks in the layout's chunks (``ral.distributed.chunks``): each rank holds its shard of q, k, v,
q_ref, k_ref (all heads), gathers keys / values, runs its rows and reduce-scatters dK / dV.

Per (P, layout):

- memory: a fresh group of P spawned processes (each torch and ral at --threads, default 1); after
  a tiny warm-up call, each rank's resident-set peak above its resident set once its shard exists
  (providers.RssMeter) during the first call at the real shape: ``peak_rss_growth`` per rank.
- time: one group of max(P) spawned processes runs every (P, layout) in interleaved rounds (the
  order rotated by one each round; a sub-group of the first P ranks runs a config while the others
  wait in a barrier): per step, each member waits at a barrier, then times the forward + backward
  (wall ``perf_counter`` and ``time.process_time``). The step time is the max over ranks; the
  table gives its median over rounds, and each rank's median CPU time.
- balance: causal tiles per rank from ``ral.distributed.causal_work`` (64 x 64 tiles), and
  max / mean (1.0 = perfect).

On a machine with fewer free cores than ranks (this one: 2 CPUs shared with other jobs) the wall
time of 2 and 4 ranks cannot show a speed-up; the per-rank CPU time can show how the work splits
(the critical path on P idle cores, communication excluded except its CPU cost).

Writes <out>/<tag>.json, .csv and .png (tag bench_cp_<device>[_quick]).
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import socket
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

import providers as P  # noqa: E402
import report  # noqa: E402

import ral.distributed as rd  # noqa: E402

COLORS = {"zigzag": "#1f77b4", "contiguous": "#d62728", "single": "#7f7f7f"}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (nccl, one GPU per rank); default cpu")
    ap.add_argument("--seqlen", type=int, default=None, help="S (default 8192; --quick 1024)")
    ap.add_argument("--ranks", default=None, help="comma list of world sizes (default 1,2,4; --quick 1,2)")
    ap.add_argument("--layouts", default="zigzag,contiguous", help=f"comma list of {rd.LAYOUTS}")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    P.add_problem_arguments(ap)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--threads", type=int, default=1, help="torch / ral threads per rank (default 1)")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds (default 3; --quick 3)")
    ap.add_argument("--max-seconds", type=float, default=None,
                    help="stop the timing rounds after this many wall seconds (at least one round runs)")
    ap.add_argument("--block", type=int, default=64, help="tile size of the causal_work balance (default 64)")
    ap.add_argument("--no-memory", action="store_true", help="skip the per-config memory groups")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds before a process group is killed")
    ap.add_argument("--quick", action="store_true")
    report.add_output_arguments(ap, "bench_cp")
    return ap.parse_args(argv)


def resolve(args) -> dict:
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    ranks = [int(x) for x in (args.ranks or ("1,2" if args.quick else "1,2,4")).split(",")]
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SystemExit(f"--device {device}: torch {torch.__version__} sees no CUDA device (a CPU-only torch "
                             "build, or no GPU/driver here); use --device cpu")
        if not dist.is_nccl_available():
            raise SystemExit(f"--device {device}: this torch build has no NCCL; use --device cpu (gloo)")
        n_gpu = torch.cuda.device_count()
        if max(ranks) > n_gpu:
            raise SystemExit(f"--ranks {ranks}: --device cuda runs one GPU per rank and this machine has {n_gpu}; "
                             f"pass --ranks up to {n_gpu}")
        device = "cuda"
    elif device != "cpu":
        raise SystemExit(f"--device must be cpu, cuda or auto, got {device!r}")
    layouts = args.layouts.split(",")
    for lay in layouts:
        if lay not in rd.LAYOUTS:
            raise SystemExit(f"--layouts: unknown layout {lay!r}; choose from {rd.LAYOUTS}")
    configs = []
    for world in ranks:   # one rank: the layouts do the same work; run it once ("single")
        configs += [(world, "single")] if world == 1 else [(world, lay) for lay in layouts]
    return dict(device=device, seqlen=args.seqlen or (1024 if args.quick else 8192), ranks=ranks, layouts=layouts,
                configs=configs, heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim,
                **P.problem_options(args, device), backend=args.backend, threads=args.threads,
                repeats=args.repeats or 3, max_seconds=args.max_seconds, block=args.block)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------------------
# Inside a rank
# ----------------------------------------------------------------------------------------------

def _inputs(cfg: dict, seq: int, layout: str, group, device) -> dict:
    """This rank's shards of one whole-sequence batch (the same seed on every rank)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    h, hkv, d = cfg["heads"], cfg["kv_heads"], cfg["head_dim"]
    dt = getattr(torch, cfg["dtype"])
    each = cfg["heads_mode"] == "each"
    whole = dict(q=torch.randn(1, h, seq, d, generator=gen), k=torch.randn(1, hkv, seq, d, generator=gen),
                 v=torch.randn(1, hkv, seq, d, generator=gen), q_ref=torch.randn(1, h, seq, d, generator=gen),
                 k_ref=torch.randn(1, hkv, seq, d, generator=gen),
                 dout=torch.randn(1, h, seq, d, generator=gen) * 0.1,
                 ddiv=torch.randn(*((1, h, seq) if each else (1, seq)), generator=gen))
    lay = "contiguous" if layout == "single" else layout
    inp = {}
    for name, t in whole.items():
        part = rd.shard(t, t.dim() - 2 if name != "ddiv" else t.dim() - 1, group, lay).contiguous()
        part = part.to(device=device, dtype=torch.float32 if name == "ddiv" else dt)
        inp[name] = part.requires_grad_(name in ("q", "k", "v"))
    del whole
    return inp


def _step(inp: dict, cfg: dict, seq: int, layout: str, group) -> None:
    for name in ("q", "k", "v"):
        inp[name].grad = None
    r = rd.attention_kl_cp(inp["q"], inp["k"], inp["v"], q_ref=inp["q_ref"], k_ref=inp["k_ref"], seq_len=seq,
                           group=group, layout="contiguous" if layout == "single" else layout,
                           divergence=cfg["divergence"], heads=cfg["heads_mode"], causal=cfg["causal"],
                           backend=cfg["backend"])
    torch.autograd.backward([r.out, r.div], [inp["dout"], inp["ddiv"]])


def _init(rank: int, world: int, port: int, cfg: dict):
    torch.set_num_threads(cfg["threads"])
    gpu = cfg["device"] == "cuda"
    if gpu:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if gpu else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    return torch.device("cuda", rank) if gpu else torch.device("cpu")


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_rank(rank: int, world: int, port: int, cfg: dict, layout: str, queue) -> None:
    """One rank of a fresh group: tiny warm-up, then the peak of the first call at the real shape."""
    try:
        device = _init(rank, world, port, cfg)
        tiny = _inputs(cfg, 64 * world, layout, None, device)
        _step(tiny, cfg, 64 * world, layout, None)
        del tiny
        inp = _inputs(cfg, cfg["seqlen"], layout, None, device)
        meter = P.meter_for(str(device))
        dist.barrier()
        meter.start()
        c0, t0 = time.process_time(), time.perf_counter()
        _step(inp, cfg, cfg["seqlen"], layout, None)
        _sync(device)
        res = dict(status="ok", peak_rss_growth=meter.peak(), first_call_s=time.perf_counter() - t0,
                   first_call_cpu_s=time.process_time() - c0)
    except BaseException as err:  # noqa: BLE001
        res = dict(status="oom" if P.is_oom(err) else "error", note=f"{type(err).__name__}: {err}"[:300])
    queue.put((rank, res))
    try:
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        pass


def time_rank(rank: int, world: int, port: int, cfg: dict, queue) -> None:
    """One rank of the timing group: every config in interleaved rounds (see the module docstring)."""
    res = {}
    try:
        device = _init(rank, world, port, cfg)
        groups = {}
        for w in sorted({w for w, _ in cfg["configs"]}):
            g = dist.new_group(list(range(w)))    # every rank must take part in creating every group
            groups[w] = g if rank < w else None
        inputs, warm = {}, {}
        configs = [tuple(c) for c in cfg["configs"]]
        for world_c, layout in configs:
            if rank < world_c:
                inputs[(world_c, layout)] = _inputs(cfg, cfg["seqlen"], layout, groups[world_c], device)
                t0 = time.perf_counter()
                _step(inputs[(world_c, layout)], cfg, cfg["seqlen"], layout, groups[world_c])
                _sync(device)
                warm[(world_c, layout)] = time.perf_counter() - t0
            dist.barrier()
        wall = {c: [] for c in configs}
        cpu = {c: [] for c in configs}
        t_start = time.perf_counter()
        rounds = 0
        for rnd in range(cfg["repeats"]):
            if cfg.get("max_seconds") is not None and rnd > 0:
                stop = torch.tensor([float(time.perf_counter() - t_start > cfg["max_seconds"])])
                dist.all_reduce(stop)                # rank 0's clock and everyone's agree: stop together
                if stop.item() > 0:
                    break
            k = rnd % len(configs)
            for c in configs[k:] + configs[:k]:
                world_c, layout = c
                if rank < world_c:
                    dist.barrier(group=groups[world_c])
                    c0, t0 = time.process_time(), time.perf_counter()
                    _step(inputs[c], cfg, cfg["seqlen"], layout, groups[world_c])
                    _sync(device)
                    wall[c].append(time.perf_counter() - t0)
                    cpu[c].append(time.process_time() - c0)
                dist.barrier()
            rounds += 1
            if rank == 0:
                queue.put(("round", rounds))
        res = {f"{w}/{lay}": dict(status="ok", times=wall[(w, lay)], cpu_times=cpu[(w, lay)], warmup_s=warm[(w, lay)])
               for w, lay in configs if rank < w}
    except BaseException as err:  # noqa: BLE001
        res = dict(error=f"{type(err).__name__}: {err}"[:300])
    queue.put((rank, res))
    try:
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        pass


_CTX = []


def _context():
    """forkserver (its server imports torch and ral once; each rank is a cheap fork of it, with no
    thread pool or process group inherited) where available, else spawn."""
    if not _CTX:
        method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
        ctx = mp.get_context(method)
        if method == "forkserver":
            ctx.set_forkserver_preload(["torch", "torch.distributed", "ral", "ral.distributed", "providers"])
        _CTX.append(ctx)
    return _CTX[0]


def run_group(target, world: int, args: tuple, timeout: float, on_round=None) -> dict:
    """Spawn `world` ranks of `target(rank, world, port, *args, queue)`; {rank: result} (missing
    ranks: they died or timed out)."""
    ctx = _context()
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=target, args=(r, world, port, *args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    out, deadline = {}, time.time() + timeout
    while len(out) < world and time.time() < deadline:
        try:
            key, val = queue.get(timeout=1.0)
        except Exception:  # noqa: BLE001 - queue.Empty
            if all(not p.is_alive() for p in procs) and queue.empty():
                break
            continue
        if key == "round":
            if on_round is not None:
                on_round(val)
            continue
        out[key] = val
    for p in procs:
        p.join(timeout=5.0)
        if p.is_alive():
            p.kill()
            p.join()
    if len(out) < world:
        codes = [p.exitcode for p in procs]
        for r in range(world):
            out.setdefault(r, dict(status="error", error=f"rank {r} gave no result (exit codes {codes}; "
                                                        f"timeout {timeout:.0f} s or killed)"))
    return out


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------

def balance(cfg: dict, world: int, layout: str) -> dict:
    work = rd.causal_work(cfg["seqlen"], world, "contiguous" if layout == "single" else layout, cfg["block"])
    mean = sum(work) / len(work)
    return dict(tiles=work, tiles_max_over_mean=max(work) / mean)


def table(rows: list) -> str:
    def cpus(r):
        return " ".join(P.fmt_time(c) for c in r["cpu_s_per_rank"]) if r.get("cpu_s_per_rank") else "-"

    def peak(r):
        return P.fmt_bytes(max(r["peak_rss_growth_per_rank"])) if r.get("peak_rss_growth_per_rank") else "-"

    return report.run_table(rows, lambda r: f"{r['ranks']:>2} {r['layout']}", [
        ("P layout", 13, None),
        ("step (max rank)", 15, lambda r: P.fmt_time(r.get("time_s"))),
        ("CPU/rank (median, per rank)", 36, cpus),
        ("CPU max", 9, lambda r: P.fmt_time(r.get("cpu_s_max"))),
        ("CPU sum", 9, lambda r: P.fmt_time(r.get("cpu_s_sum"))),
        ("RSS growth/rank (max)", 22, peak),
        ("tiles/rank", 24, lambda r: " ".join(map(str, r["tiles"]))),
        ("max/mean", 8, lambda r: f"{r['tiles_max_over_mean']:.2f}"),
    ])


def summary_lines(rows: list, cfg: dict) -> list:
    ok = {(r["ranks"], r["layout"]): r for r in rows if r["status"] == "ok" and r.get("cpu_s_max")}
    lines = []
    one = ok.get((1, "single"))
    for (w, lay), r in sorted(ok.items()):
        if w == 1 or one is None:
            continue
        lines.append(f"P={w} {lay}: critical-path CPU (max over ranks) {P.fmt_time(r['cpu_s_max'])} = "
                     f"{one['cpu_s_max'] / r['cpu_s_max']:.2f}x below 1 rank's (ideal {w}x; tile balance "
                     f"max/mean {r['tiles_max_over_mean']:.2f}); total CPU {r['cpu_s_sum'] / one['cpu_s_max']:.2f}x "
                     f"of 1 rank's; wall step {P.fmt_time(r['time_s'])} vs {P.fmt_time(one['time_s'])}")
    return lines


def plot(rows: list, meta: dict, path: str):
    plt = report.pyplot()
    if plt is None:  # pragma: no cover
        return None
    ok = [r for r in rows if r["status"] == "ok" and r.get("cpu_s_max")]
    if not ok:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    for lay in ("zigzag", "contiguous"):
        pts = sorted([r for r in ok if r["layout"] in (lay, "single")], key=lambda r: r["ranks"])
        if len(pts) < 1:
            continue
        xs = [r["ranks"] for r in pts]
        axes[0].plot(xs, [r["cpu_s_max"] for r in pts], marker="o", color=COLORS[lay], label=f"{lay}: CPU, max rank")
        axes[0].plot(xs, [r["time_s"] for r in pts], marker="s", linestyle="--", color=COLORS[lay],
                     label=f"{lay}: wall step (max rank)")
        axes[1].plot(xs, [max(r["peak_rss_growth_per_rank"] or [0]) / P.MIB for r in pts], marker="o",
                     color=COLORS[lay], label=lay)
    one = next((r for r in ok if r["ranks"] == 1), None)
    if one is not None:
        xs = sorted({r["ranks"] for r in ok})
        axes[0].plot(xs, [one["cpu_s_max"] / x for x in xs], linestyle=":", color="black", label="1 rank's CPU / P")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["ranks"] for r in ok}))
        ax.set_xticklabels([str(x) for x in sorted({r["ranks"] for r in ok})])
        ax.set_xlabel("ranks P")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("seconds per forward + backward")
    axes[1].set_ylabel("peak RSS growth per rank (MiB, max over ranks)")
    cfg = meta["config"]
    return report.finish_figure(
        fig, f"attention_kl_cp, S={cfg['seqlen']}, H={cfg['heads']}, Hkv={cfg['kv_heads']}, D={cfg['head_dim']}, "
             f"{cfg['dtype']}, {'causal, ' if cfg['causal'] else ''}{cfg['divergence']}, heads={cfg['heads_mode']}, "
             f"{cfg['threads']} thread/rank", meta, path)


def main(argv=None):
    args = parse_args(argv)
    cfg = resolve(args)
    gpu = cfg["device"] == "cuda"
    tag = args.tag or f"bench_cp_{cfg['device']}" + ("_quick" if args.quick else "")
    t_start = time.time()
    load_start = P.load_average()
    configs = cfg["configs"]
    try:
        from tqdm import tqdm
        bar = tqdm(total=(0 if args.no_memory else len(configs)) + cfg["repeats"], disable=args.no_progress,
                   unit="pt", dynamic_ncols=True, file=sys.stderr)
    except ImportError:  # pragma: no cover
        bar = None
    rows = {}
    for world, lay in configs:
        rows[(world, lay)] = dict(provider=f"cp-{lay}", backend=cfg["backend"], mode="full", S=cfg["seqlen"], B=1,
                                  H=cfg["heads"], Hkv=cfg["kv_heads"], D=cfg["head_dim"], dtype=cfg["dtype"],
                                  device=cfg["device"], causal=cfg["causal"], divergence=cfg["divergence"],
                                  heads_mode=cfg["heads_mode"], ranks=world, layout=lay, status="ok", note="",
                                  peak_bytes=None, peak_rss_growth_per_rank=None, **balance(cfg, world, lay),
                                  **P.versions())
    if not args.no_memory:
        for world, lay in configs:
            if bar is not None:
                bar.set_description(f"memory P={world} {lay}")
            out = run_group(memory_rank, world, (cfg, lay), args.timeout)
            row = rows[(world, lay)]
            bad = [out[r] for r in range(world) if out[r].get("status") != "ok"]
            if bad:
                row.update(status=bad[0].get("status", "error"), note=bad[0].get("note") or bad[0].get("error", ""))
            else:
                row.update(peak_rss_growth_per_rank=[out[r]["peak_rss_growth"] for r in range(world)],
                           first_call_s=max(out[r]["first_call_s"] for r in range(world)),
                           first_call_cpu_s_per_rank=[out[r]["first_call_cpu_s"] for r in range(world)])
                row["peak_bytes"] = max(row["peak_rss_growth_per_rank"])
            if bar is not None:
                bar.update(1)
    timed = [c for c in configs if rows[c]["status"] == "ok"]
    if timed:
        if bar is not None:
            bar.set_description(f"timing {len(timed)} configs (interleaved rounds, {max(w for w, _ in timed)} ranks)")
        tcfg = dict(cfg, configs=[list(c) for c in timed])
        world = max(w for w, _ in timed)
        out = run_group(time_rank, world, (tcfg,), args.timeout,
                        on_round=(lambda _r: bar.update(1)) if bar is not None else None)
        errors = [v.get("error") for v in out.values() if "error" in v]
        for w, lay in timed:
            row = rows[(w, lay)]
            per = [out[r].get(f"{w}/{lay}") for r in range(w)]
            if errors or any(p is None for p in per):
                row.update(status="error", note=(errors[0] if errors else "a rank gave no timing"))
                continue
            n = min(len(p["times"]) for p in per)
            step_times = [max(p["times"][i] for p in per) for i in range(n)]
            cpu_ranks = [statistics.median(p["cpu_times"]) for p in per]
            row.update(time_s=statistics.median(step_times), step_times=step_times, repeats=n,
                       times_per_rank=[p["times"] for p in per], cpu_times_per_rank=[p["cpu_times"] for p in per],
                       cpu_s_per_rank=cpu_ranks, cpu_s_max=max(cpu_ranks), cpu_s_sum=sum(cpu_ranks),
                       warmup_s=max(p["warmup_s"] for p in per))
    if bar is not None:
        bar.close()
    rows = [rows[c] for c in configs]
    wall = time.time() - t_start
    summary = summary_lines(rows, cfg)
    argv_list = list(sys.argv[1:] if argv is None else argv)
    meta = dict(command="python benchmarks/bench_cp.py" + (" " + shlex.join(argv_list) if argv_list else ""),
                date=datetime.datetime.now().isoformat(timespec="seconds"), config=cfg,
                device_description=(P.device_description("cuda") + f" x{max(cfg['ranks'])} ranks" if gpu else
                                    f"{P.cpu_description()}, {cfg['threads']} thread(s) "
                                    f"per rank, gloo"),
                cpu_count=os.cpu_count(), load_average_start=load_start, load_average_end=P.load_average(),
                wall_s=round(wall, 1), oversubscribed=(not gpu and max(cfg["ranks"]) * cfg["threads"] >
                                                       (os.cpu_count() or 1)),
                memory_meter=("torch.cuda.max_memory_allocated above the shards" if gpu else
                              "VmHWM (reset via /proc/self/clear_refs) above VmRSS once the shards exist, "
                              "per rank, fresh group per config"),
                timing="one group of max(P) ranks; configs in interleaved rounds (rotated); per step barrier, then "
                       "wall (perf_counter) and time.process_time per rank; step = max over ranks; medians",
                **P.versions())
    print(f"\nral {meta['ral_version']}, torch {meta['torch_version']}, {meta['device_description']}")
    print(f"S={cfg['seqlen']} B=1 H={cfg['heads']} Hkv={cfg['kv_heads']} D={cfg['head_dim']} {cfg['dtype']} "
          f"{'causal' if cfg['causal'] else 'non-causal'} {cfg['divergence']} heads={cfg['heads_mode']}, forward + "
          f"backward; load average {load_start} -> {meta['load_average_end']}")
    if meta["oversubscribed"]:
        print(f"note: up to {max(cfg['ranks'])} ranks x {cfg['threads']} thread(s) on {os.cpu_count()} CPUs: "
              "oversubscribed; wall times cannot show a speed-up, read the CPU time per rank")
    print(table(rows))
    report.publish(rows, meta, summary, args.out_dir, tag, wall,
                   plots=[] if args.no_plot else [lambda: plot(rows, meta, os.path.join(args.out_dir, f"{tag}.png"))])
    return rows


if __name__ == "__main__":
    main()
