"""The zoomsearch experiment of issue #15: GRPO vs RAL per resolution, plus controls.

    python benchmarks/results/zoomsearch/run_experiment.py pilot     # lambda on pilot seeds, N = 64
    python benchmarks/results/zoomsearch/run_experiment.py main --lambda-attn L
    python benchmarks/results/zoomsearch/run_experiment.py controls --lambda-attn L
    python benchmarks/results/zoomsearch/run_experiment.py report     # tables, JSON, PNGs

Every run is ``ral train --task zoomsearch ...`` (``ral.train.cli.main`` called in this process, one run
at a time, so imports are paid once); its argv is written to ``commands.txt``. A run whose
``metrics.jsonl`` already reaches the last step is skipped, so the script can be re-run after an
interrupt. Run directories: ``runs/<arm>-n<N>-i<init>-s<seed>/``; the SFT checkpoints
(``sft-zoomsearch*-mixed-s<init>-<steps>.pt``) sit in ``runs/`` and are shared by all runs of an init.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RUNS = os.path.join(HERE, "runs")
GRIDS = (4, 8, 16)                       # N = 16, 64, 256
INITS = (0, 1, 2)
SEEDS = (0, 1)
PILOT_SEEDS = (100,)
PILOT_LAMBDAS = (1.0, 5.0, 25.0)

# shared RL / SFT settings (CPU-sized; see README)
COMMON = ["--steps", "20", "--prompts-per-step", "4", "--group-size", "8", "--ppo-epochs", "2",
          "--minibatch-size", "16", "--lr", "5e-4", "--beta", "0.04", "--loss-type", "grpo",
          "--temperature", "1.0", "--eval-prompts", "128", "--eval-every", "10", "--threads", "1",
          "--sft-steps", "2500", "--sft-lr", "3e-3", "--sft-attn-weight", "1.0", "--sft-stop-accuracy", "0.4",
          "--sft-direct-steps", "150", "--ratio-every", "5", "--backend", "auto", "--no-progress"]


def run_dir(arm: str, grid: int, init: int, seed: int) -> str:
    return os.path.join(RUNS, f"{arm}-n{grid * grid}-i{init}-s{seed}")


def argv_for(arm: str, grid: int, init: int, seed: int, lam: float) -> list:
    """arm: grpo, ral, ral-shuffle, oracle, direct-grpo, direct-ral (lam: RAL's / the oracle's weight)."""
    method = "grpo" if arm in ("grpo", "direct-grpo") else "ral"
    argv = ["train", "--task", "zoomsearch", "--method", method, "--grid", str(grid), "--seed", str(seed),
            "--sft-seed", str(init), "--out", run_dir(arm, grid, init, seed), "--lambda-attn", str(lam)] + COMMON
    if arm.startswith("direct"):
        argv += ["--format", "direct"]
    if arm == "ral-shuffle":
        argv += ["--attn-control", "shuffle"]
    if arm == "oracle":
        argv += ["--attn-control", "oracle"]
    return argv


def _steps(argv) -> int:
    return int(argv[argv.index("--steps") + 1])


def done(path: str, steps: int) -> bool:
    try:
        with open(os.path.join(path, "metrics.jsonl")) as f:
            rows = [json.loads(x) for x in f if x.strip()]
        return bool(rows) and rows[-1]["step"] >= steps
    except OSError:
        return False


def launch(argv: list) -> None:
    from ral.train.cli import main
    out = argv[argv.index("--out") + 1]
    if done(out, _steps(argv)):
        return
    os.makedirs(RUNS, exist_ok=True)
    with open(os.path.join(HERE, "commands.txt"), "a") as f:
        f.write("ral " + " ".join(os.path.relpath(a, HERE) if a.startswith(HERE) else a for a in argv) + "\n")
    t0 = time.time()
    main(argv)
    wall = time.time() - t0
    with open(os.path.join(out, "wall_time.json"), "w") as f:
        json.dump({"wall_s": wall, "argv": argv}, f)
    ckpt = os.path.join(out, "checkpoint.pt")
    if os.path.exists(ckpt):
        os.remove(ckpt)              # 1.5 MB each; the metrics are what the README uses
    print(f"[{time.strftime('%H:%M:%S')}] {os.path.basename(out)}: {wall:.0f} s", flush=True)


def launch_all(argvs: list, desc: str) -> None:
    """Run the argvs one after the other, with a tqdm bar over the runs (done runs are skipped)."""
    from tqdm.auto import tqdm
    for argv in tqdm(argvs, desc=desc):
        launch(argv)


def pilot_argv(argv: list) -> list:
    """The pilot ran before the budget cut: 8 prompts per step, minibatches of 32, 256 eval prompts."""
    argv = list(argv)
    for flag, value in (("--prompts-per-step", "8"), ("--minibatch-size", "32"), ("--eval-prompts", "256")):
        argv[argv.index(flag) + 1] = value
    return argv


def stage_pilot(args):
    argvs = []
    for seed in PILOT_SEEDS:
        argvs.append(pilot_argv(argv_for("grpo", 8, 0, seed, 0.0)))
        for lam in PILOT_LAMBDAS:
            argv = pilot_argv(argv_for("ral", 8, 0, seed, lam))
            argv[argv.index("--out") + 1] = os.path.join(RUNS, f"pilot-ral{lam:g}-n64-i0-s{seed}")
            argvs.append(argv)
    launch_all(argvs, "pilot")


def stage_main(args):
    argvs = [argv_for(arm, grid, init, seed, args.lambda_attn)
             for grid in args.grids for init in INITS for seed in SEEDS for arm in ("grpo", "ral")]
    launch_all(argvs, "main")


def stage_all(args):
    """main + controls in priority order, so that whatever the budget cuts off is the least
    needed: N = 16 and 64 (all pairs), the N = 256 pairs (all), then the controls at N = 256 for
    ``--control-seeds``: the oracle (positive control) for every init, then the control format,
    then the shuffled advantages."""
    big = max(GRIDS)
    argvs = [argv_for(arm, grid, init, seed, args.lambda_attn)
             for grid in GRIDS for init in INITS for seed in SEEDS for arm in ("grpo", "ral")]
    for arms in (("oracle",), ("direct-grpo", "direct-ral"), ("ral-shuffle",)):
        for seed in args.control_seeds:
            for init in INITS:
                for arm in arms:
                    lam = args.oracle_weight if arm == "oracle" else 0.0 if arm == "direct-grpo" else args.lambda_attn
                    argvs.append(argv_for(arm, big, init, seed, lam))
    launch_all(argvs, "all")


def stage_controls(args):
    grid = max(GRIDS)
    argvs = []
    for init in INITS:
        for seed in args.control_seeds:
            argvs += [argv_for("ral-shuffle", grid, init, seed, args.lambda_attn),
                      argv_for("oracle", grid, init, seed, args.oracle_weight),
                      argv_for("direct-grpo", grid, init, seed, 0.0),
                      argv_for("direct-ral", grid, init, seed, args.lambda_attn)]
    launch_all(argvs, "controls")


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------

def read_run(path: str) -> dict:
    with open(os.path.join(path, "metrics.jsonl")) as f:
        rows = [json.loads(x) for x in f if x.strip()]
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    wall = None
    if os.path.exists(os.path.join(path, "wall_time.json")):
        with open(os.path.join(path, "wall_time.json")) as f:
            wall = json.load(f)["wall_s"]
    return {"rows": rows, "config": cfg, "wall_s": wall}


def tail_mean(rows, key, k=10):
    vals = [r[key] for r in rows if key in r][-k:]
    return statistics.fmean(vals) if vals else float("nan")


def summary(run: dict) -> dict:
    rows = run["rows"]
    evals = [r["eval_accuracy"] for r in rows if "eval_accuracy" in r]
    out = {"final_eval_accuracy": evals[-1] if evals else float("nan"),
           "start_eval_accuracy": run["config"]["start_eval"]["accuracy"],
           "mean_eval_accuracy": statistics.fmean(evals) if evals else float("nan"),
           "wall_s": run["wall_s"]}
    for key in ("reward", "attn_ans_target", "attn_look_target", "attn_ans_target_best_head",
                "attn_look_target_best_head", "attn_ans_dispersion", "region_diversity", "grad_ratio", "attn_jsd"):
        out[key] = tail_mean(rows, key)
    out["gain"] = out["final_eval_accuracy"] - out["start_eval_accuracy"]
    return out


def paired(a: list, b: list) -> dict:
    """b - a over pairs: mean, 95% paired-t CI, number of pairs with b > a."""
    from scipy import stats
    d = [y - x for x, y in zip(a, b)]
    n = len(d)
    mean = statistics.fmean(d)
    sd = statistics.stdev(d) if n > 1 else float("nan")
    half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n) if n > 1 else float("nan")
    return {"mean": mean, "ci95": [mean - half, mean + half], "better": sum(x > 0 for x in d), "n": n,
            "diffs": d}


def collect(arm: str, grid: int) -> dict:
    out = {}
    for init in INITS:
        for seed in SEEDS:
            p = run_dir(arm, grid, init, seed)
            if os.path.exists(os.path.join(p, "metrics.jsonl")):
                out[(init, seed)] = read_run(p)
    return out


def md_table(headers: list, rows: list) -> list:
    """Markdown table lines: the header, the separator, one line per row (cells printed with str)."""
    return (["| " + " | ".join(map(str, headers)) + " |", "|" + "---|" * len(headers)]
            + ["| " + " | ".join(map(str, row)) + " |" for row in rows])


def fmt_ci(p):
    return f"{p['mean']:+.3f} [{p['ci95'][0]:+.3f}, {p['ci95'][1]:+.3f}] ({p['better']}/{p['n']})"


def stage_report(args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    result = {"per_run": {}, "tables": {}, "controls": {}, "pilot": {}}
    lines = []
    metrics = ["final_eval_accuracy", "mean_eval_accuracy", "attn_ans_target", "attn_look_target",
               "attn_ans_target_best_head", "attn_ans_dispersion", "grad_ratio"]

    def compare(arm_a, arm_b, grid, label):
        ra, rb = collect(arm_a, grid), collect(arm_b, grid)
        keys = sorted(set(ra) & set(rb))
        if not keys:
            return None
        sa = {k: summary(ra[k]) for k in keys}
        sb = {k: summary(rb[k]) for k in keys}
        for arm, s in ((arm_a, sa), (arm_b, sb)):
            for k, v in s.items():
                result["per_run"][f"{arm}-n{grid * grid}-i{k[0]}-s{k[1]}"] = v
        table = {}
        for m in metrics + ["start_eval_accuracy", "wall_s"]:
            a = [sa[k][m] for k in keys]
            b = [sb[k][m] for k in keys]
            if any(x is None or (isinstance(x, float) and math.isnan(x)) for x in a + b):
                table[m] = {"a": a, "b": b}
                continue
            table[m] = {"a_mean": statistics.fmean(a), "b_mean": statistics.fmean(b), "paired": paired(a, b)}
        lines.append(f"\n### {label} (N = {grid * grid}; {arm_b} - {arm_a}, {len(keys)} pairs)\n")
        lines.append("per pair (init, seed): final eval acc " + ", ".join(
            f"i{k[0]}s{k[1]}: {sa[k]['final_eval_accuracy']:.3f} -> {sb[k]['final_eval_accuracy']:.3f}" for k in keys))
        lines.append("")
        for arm, sx in ((arm_a, sa), (arm_b, sb)):
            ratios = [sx[k]["grad_ratio"] for k in keys if not math.isnan(sx[k]["grad_ratio"])]
            if ratios:
                lines.append(f"{arm}: ||grad(lambda L_attn)|| / ||grad(L_RL)|| mean {statistics.fmean(ratios):.3g} "
                             f"(runs {min(ratios):.3g} .. {max(ratios):.3g})")
            disp = {i: statistics.fmean(sx[k]["attn_ans_dispersion"] for k in keys if k[0] == i) for i in INITS
                    if any(k[0] == i for k in keys)}
            lines.append(f"{arm}: <ans>-row dispersion (nats, last 10 steps) by init: "
                         + ", ".join(f"i{i} {v:.2e}" for i, v in disp.items()))
        lines.append("")
        lines.extend(md_table(["metric", arm_a, arm_b, f"{arm_b} - {arm_a}: mean [95% CI] (pairs better)"],
                          [[m, f"{table[m]['a_mean']:.3f}", f"{table[m]['b_mean']:.3f}", fmt_ci(table[m]["paired"])]
                           for m in metrics + ["start_eval_accuracy", "wall_s"] if "paired" in table[m]]))
        return table

    for grid in GRIDS:
        t = compare("grpo", "ral", grid, "GRPO vs RAL")
        if t:
            result["tables"][f"N{grid * grid}"] = t
    big = max(GRIDS)
    for a, b in (("grpo", "ral-shuffle"), ("grpo", "oracle"), ("direct-grpo", "direct-ral"), ("ral", "ral-shuffle")):
        t = compare(a, b, big, f"control: {b} vs {a}")
        if t:
            result["controls"][f"{b}_vs_{a}"] = t

    # H2: the gap grows with N: (RAL - GRPO at N=256) - (RAL - GRPO at N=16), paired by (init, seed)
    d = {}
    for grid in GRIDS:
        t = result["tables"].get(f"N{grid * grid}")
        if t:
            d[grid] = t["final_eval_accuracy"]["paired"]["diffs"]
    if min(GRIDS) in d and big in d and len(d[big]) == len(d[min(GRIDS)]):
        result["H2_contrast"] = paired(d[min(GRIDS)], d[big])
        lines.append(f"\nH2 contrast (gap at N={big * big} minus gap at N={min(GRIDS) ** 2}, final eval accuracy): "
                     f"{fmt_ci(result['H2_contrast'])}")

    # pilot
    pil = {}
    for name in sorted(os.listdir(RUNS)) if os.path.isdir(RUNS) else []:
        if name.startswith("pilot-") or (name.startswith("grpo-n64-i0-s") and int(name.split("-s")[-1]) in PILOT_SEEDS):
            p = os.path.join(RUNS, name)
            if os.path.exists(os.path.join(p, "metrics.jsonl")):
                pil[name] = summary(read_run(p))
    result["pilot"] = pil
    if pil:
        lines.append(f"\n### Pilot (N = 64, init 0, RL seed(s) {PILOT_SEEDS}; 8 prompts per step)\n")
        lines.extend(md_table(["run", "final eval acc", "mean eval acc", "attn_ans_target", "grad_ratio", "wall s"],
                          [[name, f"{s['final_eval_accuracy']:.3f}", f"{s['mean_eval_accuracy']:.3f}",
                            f"{s['attn_ans_target']:.3f}", f"{s['grad_ratio']:.3g}", f"{s['wall_s'] or float('nan'):.0f}"]
                           for name, s in pil.items()]))

    # the <ans>-row dispersion per step: median, and whether its large values come with off-format samples
    disp_stats = {}
    for grid in GRIDS:
        for arm in ("grpo", "ral"):
            steps = [r for run in collect(arm, grid).values() for r in run["rows"] if "attn_ans_dispersion" in r]
            if not steps:
                continue
            vals = sorted(r["attn_ans_dispersion"] for r in steps)
            big_steps = [r for r in steps if r["attn_ans_dispersion"] > 1e-3]
            disp_stats[f"{arm}-n{grid * grid}"] = {
                "median": vals[len(vals) // 2], "mean": statistics.fmean(vals), "steps": len(vals),
                "steps_above_1e-3": len(big_steps),
                "of_those_with_format_below_1": sum(r["format"] < 1 for r in big_steps)}
    result["dispersion"] = disp_stats
    if disp_stats:
        lines.append("\n### <ans>-row within-group dispersion per step (nats; all runs of the arm)\n")
        lines.extend(md_table(["arm", "median", "mean", "steps", "steps > 1e-3", "of those, steps with off-format samples"],
                          [[k, f"{v['median']:.2e}", f"{v['mean']:.2e}", v["steps"], v["steps_above_1e-3"],
                            v["of_those_with_format_below_1"]] for k, v in disp_stats.items()]))

    # warm-up checkpoints: steps taken and greedy accuracy at every N
    import glob
    import torch
    inits = {}
    for path in sorted(glob.glob(os.path.join(RUNS, "sft-*.pt"))):
        state = torch.load(path, map_location="cpu", weights_only=False)
        inits[os.path.basename(path)] = {"steps": state.get("sft", {}).get("sft_steps"),
                                         "accuracy": {k: v["accuracy"] for k, v in state["eval"].items()}}
    result["warmups"] = inits
    if inits:
        lines.append("\n### Warm-up checkpoints (greedy accuracy on 256 eval prompts)\n")
        lines.extend(md_table(["checkpoint", "steps", "N=16", "N=64", "N=256"],
                          [[name, w["steps"]] + [f"{w['accuracy'].get(n, float('nan')):.3f}" for n in ("n16", "n64", "n256")]
                           for name, w in inits.items()]))

    with open(os.path.join(HERE, "results.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    with open(os.path.join(HERE, "tables.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))

    # curves
    curve_keys = ["eval_accuracy", "reward", "attn_ans_target", "attn_look_target", "attn_ans_dispersion",
                  "grad_ratio"]
    colours = {"grpo": "tab:blue", "ral": "tab:red", "ral-shuffle": "tab:orange", "oracle": "tab:green",
               "direct-grpo": "tab:purple", "direct-ral": "tab:brown"}

    def plot(arms, grid, path):
        fig, axes = plt.subplots(1, len(curve_keys), figsize=(3.6 * len(curve_keys), 3.2), squeeze=False)
        for ax, key in zip(axes[0], curve_keys):
            for arm in arms:
                runs = collect(arm, grid)
                series = []
                for r in runs.values():
                    pts = [(row["step"], row[key]) for row in r["rows"] if key in row]
                    if key == "eval_accuracy":
                        pts = [(0, r["config"]["start_eval"]["accuracy"])] + pts
                    if pts:
                        series.append(pts)
                        ax.plot(*zip(*pts), color=colours[arm], alpha=0.2, lw=0.8)
                if series:
                    n = min(len(s) for s in series)
                    xs = [s[0] for s in series[0][:n]]
                    ax.plot(xs, [statistics.fmean(s[i][1] for s in series) for i in range(n)], color=colours[arm],
                            lw=2, label=f"{arm} (n={len(series)})")
            ax.set_title(key, fontsize=9)
            ax.set_xlabel("RL step")
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.suptitle(f"N = {grid * grid}", fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)

    for grid in GRIDS:
        plot(["grpo", "ral"], grid, os.path.join(HERE, f"curves_n{grid * grid}.png"))
    plot(["grpo", "ral", "ral-shuffle", "oracle", "direct-grpo", "direct-ral"], big,
         os.path.join(HERE, f"controls_n{big * big}.png"))


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("stage", choices=["pilot", "main", "controls", "all", "report"])
    p.add_argument("--lambda-attn", type=float, default=5.0)
    p.add_argument("--oracle-weight", type=float, default=1.0)
    p.add_argument("--grids", type=int, nargs="+", default=list(GRIDS))
    p.add_argument("--control-seeds", type=int, nargs="+", default=list(SEEDS))
    args = p.parse_args(argv)
    {"pilot": stage_pilot, "main": stage_main, "controls": stage_controls, "all": stage_all,
     "report": stage_report}[args.stage](args)


if __name__ == "__main__":
    sys.exit(main())
