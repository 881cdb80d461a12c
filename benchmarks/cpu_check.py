#!/usr/bin/env python
"""One command for a CPU where ral-cpu is slower than it should be (issue 17: an Intel Xeon with
AVX-512): which vector width, how many threads and which phase, measured on that machine.

    python benchmarks/cpu_check.py              # S = 4096, ~2-4 min; writes benchmarks/out/cpu_check.*
    python benchmarks/cpu_check.py --quick      # S = 512, one round, < 1 min
    python benchmarks/cpu_check.py --lanes 8,4  # also time these vector widths (built at -O3)

The problem is the main job's (B=1, H=Hkv=8, D=64, fp32, jsd, heads="mean", causal); what varies:

- the CPU kernels' vector width: the installed build (the widest the target has: 16 floats with
  AVX-512) and each of ``--lanes`` (default: 8 when the install has 16, i.e. the AVX2 code path
  with the CPU's own -march; none otherwise), built by ``tests/cpu_lanes.py`` with setup.py's flags
  (-O3) and checked against the installed kernels on a small problem before it is timed;
- the threads: 1 and every CPU this process may use (``--threads``); on a VM whose vCPUs are one
  core's SMT siblings the device line says so, and the second thread's gain shows how much they share;
- the phase: forward (no grad), backward (of a kept graph) and forward + backward.

Each (width, threads) runs in a fresh process that times ral-cpu and SDPA interleaved
(``providers.time_interleaved``: one warm-up call each, then rounds of one call per provider in a
rotating order; the median), so SDPA in the same process is the control for whatever the machine
did meanwhile; the processes alternate over ``--rounds``. Reported per cell: the median over rounds
of ral's time and of ral / SDPA. The verdicts: the main job's goal (ral-cpu within 1.6x of SDPA,
forward + backward, every usable CPU), the fastest width here (a rebuild with ``RAL_CPU_LANES=<it>
pip install -e .`` is recommended when another width beats the installed one by more than 5 % in every
round), and what the second thread gives ral and SDPA.

Writes <out>/cpu_check.json, cpu_check.md and cpu_check.png (<out>: benchmarks/out, git-ignored).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import torch  # noqa: E402

import providers as P  # noqa: E402
import report  # noqa: E402

REPO = os.path.dirname(HERE)
LANES_BUILD = os.path.join(REPO, "tests", "cpu_lanes.py")
sys.path.insert(0, os.path.dirname(LANES_BUILD))
from cpu_lanes import SETUP_OPT, WIDTHS  # noqa: E402
MODES = ("fwd", "bwd", "full")
RATIO_GOAL = 1.6                 # ral-cpu / SDPA, forward + backward (issue 17)
WIDTH_MARGIN = 0.05              # another width must win by this much in every round to be recommended
AGREEMENT_TOL = 1e-4             # variant vs installed kernels, relative to each tensor's largest element


# ----------------------------------------------------------------------------------------------
# The worker: one (width, threads) in a fresh process
# ----------------------------------------------------------------------------------------------

def load_variant(lanes: int, path: str):
    """The CPU kernels built with RAL_CPU_LANES = lanes, imported from `path` (tests/cpu_lanes.py's
    module, ral._C's interface; its module name is the file's)."""
    spec = importlib.util.spec_from_file_location(os.path.basename(path).split(".")[0], path)
    try:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except ImportError as err:
        raise RuntimeError(f"{path} is not the {lanes}-lane kernels' module: {err}") from None
    if getattr(module, "cpu_lanes", None) != lanes:
        raise RuntimeError(f"{path} is not the {lanes}-lane kernels' module: it has {getattr(module, 'cpu_lanes', None)}")
    return module


def _outputs(cfg: P.Config, seq: int) -> list:
    """out, div and the gradients of q, k, v of one forward + backward of ral-cpu at S = seq."""
    inp = P.make_inputs(cfg, seq, seed=1)
    out, div = P.provider_fn("ral-cpu")(inp, cfg)
    P.backward(out, div, inp)
    return [out.detach(), div.detach(), inp["q"].grad, inp["k"].grad, inp["v"].grad]


def agreement(module, cfg: P.Config, seq: int = 192) -> float:
    """The largest difference between `module`'s kernels and the installed ones on one small problem,
    relative to each tensor's largest element (summation order differs between widths; a broken
    build differs by far more)."""
    from ral.backends import compiled
    installed = compiled._C
    want = _outputs(cfg, seq)
    compiled._C = module
    try:
        got = _outputs(cfg, seq)
    finally:
        compiled._C = installed
    return max(float((g - w).abs().max() / w.abs().max().clamp_min(1e-30)) for g, w in zip(got, want))


def run_worker(job: dict) -> dict:
    """Times ral-cpu (with the job's kernels) and SDPA, interleaved, in each mode."""
    from ral.backends import compiled
    torch.set_num_threads(job["threads"])
    cfg = P.Config(**job["cfg"])
    checked = None
    if job.get("path"):
        module = load_variant(job["lanes"], job["path"])
        checked = agreement(module, cfg)
        if not checked <= AGREEMENT_TOL:
            raise RuntimeError(f"the {job['lanes']}-lane build disagrees with the installed kernels by "
                               f"{checked:.2e} (relative): not timed")
        compiled._C = module
    res = dict(lanes=compiled._C.cpu_lanes, threads=torch.get_num_threads(), agreement=checked, modes={})
    for mode in job["modes"]:
        timed = P.time_interleaved(["sdpa", "ral-cpu"], mode, job["seq"], cfg, repeats=job["repeats"],
                                   min_time=job["min_time"], min_repeats=job["min_repeats"])
        res["modes"][mode] = {p: dict(status=r["status"], time_s=r.get("time_s"), times=r.get("times", []),
                                      warmup_s=r.get("warmup_s"), note=r.get("note", ""))
                              for p, r in timed.items()}
    return res


# ----------------------------------------------------------------------------------------------
# Variants, rounds and the summary
# ----------------------------------------------------------------------------------------------

def installed_lanes() -> int:
    from ral.backends import compiled
    if compiled.import_error() is not None:
        raise SystemExit(f"ral._C is not built ({compiled.import_error()}): pip install -e . first")
    return int(compiled._C.cpu_lanes)


def default_lanes(native: int) -> list:
    """The other widths worth timing: 8 (AVX2's code path) where the install has AVX-512's 16."""
    return [8] if native == 16 else []


def build_variant(lanes: int) -> str:
    """tests/cpu_lanes.py's module for `lanes` at -O3 (built once, cached under build/cpu_lanes/)."""
    done = subprocess.run([sys.executable, LANES_BUILD, str(lanes), SETUP_OPT], capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"building the {lanes}-lane kernels failed: {(done.stdout + done.stderr)[-2000:]}")
    return lines[-1].split()[0]


def summarize(cells: dict, native: int) -> dict:
    """Per (lanes, threads, mode): the median over rounds of ral's and SDPA's times and of their
    per-process ratio, with every round's values."""
    out = {}
    for (lanes, threads), runs in cells.items():
        for mode in MODES:
            rows = [r["modes"][mode] for r in runs if "modes" in r and mode in r["modes"]]
            ok = [m for m in rows if m["ral-cpu"]["status"] == "ok" and m["sdpa"]["status"] == "ok"]
            if not ok:
                continue
            ral = [m["ral-cpu"]["time_s"] for m in ok]
            sdpa = [m["sdpa"]["time_s"] for m in ok]
            ratio = [a / b for a, b in zip(ral, sdpa)]
            out[f"{lanes}/{threads}/{mode}"] = dict(
                lanes=lanes, threads=threads, mode=mode, installed=lanes == native, ral_s=statistics.median(ral),
                sdpa_s=statistics.median(sdpa), ratio=statistics.median(ratio), ral_rounds=ral, sdpa_rounds=sdpa,
                ratio_rounds=ratio)
    return out


def verdicts(summary: dict, native: int, max_threads: int) -> list:
    lines = []
    base = summary.get(f"{native}/{max_threads}/full")  # the installed build, every thread, both phases
    if base:
        verdict = "PASS" if base["ratio"] <= RATIO_GOAL else "FAIL"
        lines.append(f"{verdict}: ral-cpu / SDPA, forward + backward, {max_threads} thread(s), installed "
                     f"{native}-lane build: {base['ratio']:.2f}x (goal <= {RATIO_GOAL}x)")
    for lanes in sorted({v["lanes"] for v in summary.values()}):
        other = summary.get(f"{lanes}/{max_threads}/full")
        if lanes == native or not (base and other):
            continue
        rounds = list(zip(other["ratio_rounds"], base["ratio_rounds"]))
        wins = all(o < b * (1 - WIDTH_MARGIN) for o, b in rounds)
        change = other["ratio"] / base["ratio"] - 1
        lines.append(f"{'FASTER' if wins else 'not faster'}: the {lanes}-lane build vs the installed {native}-lane "
                     f"one, forward + backward, {max_threads} thread(s): ral / SDPA {other['ratio']:.2f}x vs "
                     f"{base['ratio']:.2f}x ({change:+.0%} time)"
                     + (f" -> rebuild: RAL_CPU_LANES={lanes} pip install --no-build-isolation -e ." if wins else ""))
    one = summary.get(f"{native}/1/full")
    if one and base and max_threads > 1:
        lines.append(f"threads 1 -> {max_threads}: ral-cpu {one['ral_s'] / base['ral_s']:.2f}x faster, "
                     f"SDPA {one['sdpa_s'] / base['sdpa_s']:.2f}x faster")
    fwd, bwd = summary.get(f"{native}/{max_threads}/fwd"), summary.get(f"{native}/{max_threads}/bwd")
    if fwd and bwd:
        lines.append(f"phases ({max_threads} thread(s)): forward {P.fmt_time(fwd['ral_s'])} ({fwd['ratio']:.2f}x SDPA's), "
                     f"backward {P.fmt_time(bwd['ral_s'])} ({bwd['ratio']:.2f}x SDPA's)")
    return lines


def table(summary: dict) -> list:
    rows = ["| lanes | threads | mode | ral-cpu | SDPA | ral / SDPA | ral-cpu, every round |",
            "|---:|---:|---|---:|---:|---:|---|"]
    for v in sorted(summary.values(), key=lambda v: (-v["installed"], v["lanes"], v["threads"], MODES.index(v["mode"]))):
        rows.append(f"| {v['lanes']}{' (installed)' if v['installed'] else ''} | {v['threads']} | {v['mode']} | "
                    f"{P.fmt_time(v['ral_s'])} | {P.fmt_time(v['sdpa_s'])} | {v['ratio']:.2f}x | "
                    f"{', '.join(P.fmt_time(t) for t in v['ral_rounds'])} |")
    return rows


def plot(summary: dict, path: str, headline: str) -> str | None:
    plt = report.pyplot()
    if plt is None:
        return None
    keys = sorted(summary.values(), key=lambda v: (-v["installed"], v["lanes"], v["threads"]))
    groups = list(dict.fromkeys((v["lanes"], v["threads"]) for v in keys))
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    width = 0.8 / len(MODES)
    for i, mode in enumerate(MODES):
        vals = [summary.get(f"{l}/{t}/{mode}", {}).get("ratio", float("nan")) for l, t in groups]
        ax.bar([g + (i - 1) * width for g in range(len(groups))], vals, width, label=report.MODE_TITLES[mode])
    ax.axhline(RATIO_GOAL, color="k", ls="--", lw=1, label=f"goal {RATIO_GOAL}x (forward + backward)")
    ax.set_xticks(range(len(groups)), [f"{l} lanes, {t} thread{'s' if t > 1 else ''}" for l, t in groups])
    ax.set_ylabel("ral-cpu time / SDPA time")
    ax.set_title(headline, fontsize=9)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=4, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=None, help="S (default 4096; --quick 512)")
    ap.add_argument("--lanes", default=None, help="comma list of other vector widths to time (4, 8, 16); "
                                                  "default 8 where the install has 16, else none")
    ap.add_argument("--threads", default=None, help="comma list of thread counts (default 1 and every usable CPU)")
    ap.add_argument("--rounds", type=int, default=None, help="fresh processes per (width, threads) (default 3; --quick 1)")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per provider and mode in a process, at most")
    ap.add_argument("--min-time", type=float, default=1.0, help="seconds of timed calls after which a provider stops")
    ap.add_argument("--out", default=report.DEFAULT_OUT, help="output folder (default benchmarks/out)")
    ap.add_argument("--quick", action="store_true", help="S = 512, one round")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def int_list(text: str, name: str) -> list:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--{name}: a comma list of integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise SystemExit(f"--{name}: positive integers, got {text!r}")
    return values


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return 0
    t_start = time.perf_counter()
    native = installed_lanes()
    lanes = default_lanes(native) if args.lanes is None else int_list(args.lanes, "lanes")
    bad = [n for n in lanes if n not in WIDTHS]
    if bad:
        raise SystemExit(f"--lanes: widths are {', '.join(map(str, WIDTHS))}, got {bad}")
    lanes = [n for n in dict.fromkeys(lanes) if n != native]
    cpus = len(P.usable_cpus())
    threads = sorted({1, cpus}) if args.threads is None else sorted(set(int_list(args.threads, "threads")))
    seq = args.seq or (512 if args.quick else 4096)
    rounds = args.rounds or (1 if args.quick else 3)
    cfg = P.Config()
    print(f"cpu_check: {P.cpu_description()}; installed kernels: {native} lanes; S={seq}, B={cfg.batch}, "
          f"H=Hkv={cfg.heads}, D={cfg.head_dim}, {cfg.dtype}, {cfg.divergence}/{cfg.heads_mode}, causal; "
          f"widths {[native] + lanes}, threads {threads}, {rounds} round(s)", flush=True)
    paths = {native: None}
    for n in lanes:
        t0 = time.perf_counter()
        paths[n] = build_variant(n)
        print(f"built the {n}-lane kernels ({SETUP_OPT}) in {time.perf_counter() - t0:.0f} s: {paths[n]}", flush=True)

    jobs = [(n, t) for n in paths for t in threads]
    cells = {key: [] for key in jobs}
    try:
        from tqdm import tqdm
        bar = tqdm(total=rounds * len(jobs), desc="cpu_check", unit="process")
    except ImportError:  # pragma: no cover
        bar = None
    for rnd in range(rounds):
        order = jobs[rnd % len(jobs):] + jobs[:rnd % len(jobs)]   # rotated: no cell always first
        for n, t in order:
            job = dict(lanes=n, path=paths[n], threads=t, seq=seq, cfg=cfg.asdict(), modes=list(MODES),
                       repeats=args.repeats, min_time=args.min_time, min_repeats=3)
            res = P.spawn_json_worker(__file__, job, timeout=1800)
            cells[(n, t)].append(res)
            if "error" in res:
                print(f"  {n} lanes, {t} thread(s), round {rnd + 1}: {res['error']}", flush=True)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()

    summary = summarize(cells, native)
    lines = verdicts(summary, native, max(threads))
    os.makedirs(args.out, exist_ok=True)
    device = f"{P.cpu_description()}, installed kernels {native} lanes"
    headline = f"cpu_check S={seq}: {device}"
    data = dict(command=" ".join(["python benchmarks/cpu_check.py", *(sys.argv[1:] if argv is None else argv)]),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                device=device, usable_cpus_and_cores=P.cpu_cores(), load_average=P.load_average(),
                config=cfg.asdict(), seq=seq, rounds=rounds, threads=threads, installed_lanes=native,
                lanes=[native] + lanes, variant_paths={str(k): v for k, v in paths.items()},
                agreement={str(n): [r.get("agreement") for r in cells[(n, threads[0])]] for n in lanes},
                errors=[dict(lanes=n, threads=t, error=r["error"]) for (n, t), rs in cells.items() for r in rs
                        if "error" in r],
                summary=summary, verdicts=lines, wall_s=round(time.perf_counter() - t_start, 1), **P.versions())
    json_path = os.path.join(args.out, "cpu_check.json")
    with open(json_path, "w") as fh:
        json.dump(data, fh, indent=1)
    md = [f"# {headline}", "", f"`{data['command']}` ({data['date']}, wall {data['wall_s']:.0f} s)", "",
          *table(summary), "", *[f"- {ln}" for ln in lines]]
    md_path = os.path.join(args.out, "cpu_check.md")
    with open(md_path, "w") as fh:
        fh.write("\n".join(md) + "\n")
    png = plot(summary, os.path.join(args.out, "cpu_check.png"), headline)
    print("\n".join(table(summary)))
    print("\n".join(lines))
    print(f"wrote {', '.join(os.path.relpath(p) for p in (json_path, md_path, png) if p)}")
    return 1 if data["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
