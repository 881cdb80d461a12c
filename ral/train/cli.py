"""``ral`` command line: ``ral train`` (GRPO or GRPO + RAL on an embedded task) and ``ral compare``.

    ral train --task grounding --method grpo --seed 0 --out runs/grpo-0
    ral train --task grounding --method ral  --seed 0 --out runs/ral-0
    ral compare runs/grpo-* runs/ral-* --out runs/compare.png     # + runs/compare.json
                                                 # + runs/compare-attention.png (attention statistics)

Both methods start from the same SFT warm-up checkpoint (``--sft-checkpoint``, default
``<parent of --out>/sft-<task>.pt``, trained once and then reused) and use the same per-step
seeds, so with ``--seed N`` they see the same prompts and the same first rollout.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
from typing import List, Optional, Tuple

import torch

from ..integrations.distill import DistillConfig
from .distill import train_distill
from .tasks import get_task
from .tasks.zoomsearch import add_zoom_arguments
from .tasks.zoomsearch import cmd_train as cmd_zoomsearch
from .trainer import RALTrainer, TrainConfig, atomic_save, evaluate, sft_warmup

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ral", description="Reinforced Attention Learning tools")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="GRPO or GRPO + RAL on an embedded task (CPU-sized defaults)")
    t.add_argument("--task", default="grounding", choices=["grounding", "zoomsearch"])
    t.add_argument("--method", default="ral", choices=["grpo", "ral", "distill", "kd"],
                   help="grpo: lambda_attn = 0; ral: lambda_attn = --lambda-attn; distill: on-policy "
                        "token + attention distillation from --teacher; kd: distill without the attention term")
    t.add_argument("--seed", type=int, default=0, help="RL seed (prompts, sampling, minibatch order)")
    t.add_argument("--out", required=True, help="run directory (checkpoint.pt, metrics.jsonl); resumed if present")
    t.add_argument("--steps", type=int, default=150)
    t.add_argument("--prompts-per-step", type=int, default=16)
    t.add_argument("--group-size", type=int, default=8)
    t.add_argument("--ppo-epochs", type=int, default=2)
    t.add_argument("--minibatch-size", type=int, default=64)
    t.add_argument("--lr", type=float, default=5e-4)
    t.add_argument("--beta", type=float, default=0.04)
    t.add_argument("--epsilon", type=float, default=0.2)
    t.add_argument("--epsilon-high", type=float, default=None)
    t.add_argument("--loss-type", default="grpo", choices=["grpo", "bnpo", "dr_grpo", "dapo"])
    t.add_argument("--temperature", type=float, default=1.0)
    t.add_argument("--lambda-attn", type=float, default=5.0)
    t.add_argument("--divergence", default="jsd", choices=["jsd", "kl", "reverse_kl"])
    t.add_argument("--backend", default="auto")
    t.add_argument("--eval-prompts", type=int, default=512, help="greedy eval prompts (0: none)")
    t.add_argument("--eval-every", type=int, default=25)
    t.add_argument("--sft-checkpoint", default=None)
    t.add_argument("--sft-steps", type=int, default=1250)
    t.add_argument("--sft-lr", type=float, default=2e-3)
    t.add_argument("--sft-seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads (1 is fastest for the tiny default model; 0 = torch default)")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--attn-stats", action=argparse.BooleanOptionalAction, default=True,
                   help="log ral/attn_entropy and ral/attn_mass/<segment> of the response rows (same op call)")
    t.add_argument("--attn-entropy-coef", type=float, default=0.0,
                   help="statistics loss: - coef * attention entropy (an entropy bonus; 0: off)")
    t.add_argument("--attn-mass-coef", type=float, default=0.0,
                   help="statistics loss: - coef * attention mass on the image tokens (0: off)")
    add_distill_arguments(t)
    add_zoom_arguments(t)

    c = sub.add_parser("compare", help="reward curves of several runs -> PNG + JSON")
    c.add_argument("runs", nargs="+", help="run directories (each with metrics.jsonl)")
    c.add_argument("--out", default="compare.png", help="PNG path; the JSON goes next to it")
    c.add_argument("--metrics", default="reward,eval_accuracy,attn_entropy,attn_on_target",
                   help="comma-separated metrics, one panel each")
    c.add_argument("--smooth", type=int, default=5, help="moving-average window for the curves")
    c.add_argument("--attn-metrics", default="auto",
                   help="comma-separated attention-statistics metrics for the second figure "
                        "(<out>-attention.png); auto: ral/attn_entropy and every ral/attn_mass/* the runs logged; "
                        "'' for none")
    return p


def _sft_checkpoint(args, task):
    path = args.sft_checkpoint or os.path.join(os.path.dirname(os.path.abspath(args.out)),
                                               f"sft-{task.name}-s{args.sft_seed}-{args.sft_steps}.pt")
    if os.path.exists(path):
        return path, torch.load(path, map_location="cpu", weights_only=False)
    torch.manual_seed(args.sft_seed)
    model = task.build_model()
    sft_warmup(model, task, steps=args.sft_steps, lr=args.sft_lr, seed=args.sft_seed,
               progress=not args.no_progress)
    state = {"model": model.state_dict(), "task": task.config_dict(), "eval": evaluate(model, task, 512)}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_save(state, path)
    return path, state


def cmd_train(args) -> int:
    if args.method in ("distill", "kd"):
        return cmd_distill(args)
    if args.task == "zoomsearch":
        return cmd_zoomsearch(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    task = get_task(args.task)
    # the config is checked before the warm-up, which takes minutes
    cfg = TrainConfig(steps=args.steps, prompts_per_step=args.prompts_per_step, group_size=args.group_size,
                      ppo_epochs=args.ppo_epochs, minibatch_size=args.minibatch_size, lr=args.lr, beta=args.beta,
                      epsilon_low=args.epsilon, epsilon_high=args.epsilon_high, loss_type=args.loss_type,
                      temperature=args.temperature,
                      lambda_attn=args.lambda_attn if args.method == "ral" else 0.0,
                      divergence=args.divergence, backend=args.backend, seed=args.seed,
                      eval_prompts=args.eval_prompts, eval_every=args.eval_every, attn_stats=args.attn_stats,
                      attn_entropy_coef=args.attn_entropy_coef, attn_mass_coef=args.attn_mass_coef,
                      extra={"method": args.method, "task": args.task})
    sft_path, sft = _sft_checkpoint(args, task)
    print(f"sft checkpoint {sft_path}: {sft.get('eval')}", file=sys.stderr)
    cfg.extra["sft_checkpoint"] = sft_path
    model, ref_model = task.build_model(), task.build_model()
    model.load_state_dict(sft["model"])
    ref_model.load_state_dict(sft["model"])
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump({"method": args.method, "task": args.task, "sft": sft.get("eval"),
                   **{k: v for k, v in vars(args).items() if k not in ("func",)}}, f, indent=1)
    trainer = RALTrainer(model, task, cfg, args.out, ref_model=ref_model if cfg.beta else None)
    history = trainer.train(progress=not args.no_progress)
    if history:
        print(json.dumps(history[-1]))
    return 0


def add_distill_arguments(parser) -> None:
    """Options of ``ral train`` for ``--method distill|kd`` (add to the train sub-parser)."""
    parser.add_argument("--teacher", default=None, help="teacher checkpoint (.pt with 'model' and 'task' "
                        "config, e.g. an SFT checkpoint of a larger model); needed by --method distill|kd")
    parser.add_argument("--mu", type=float, default=1.0, help="distill/kd: weight of the token reverse KL")
    parser.add_argument("--gamma-attn", type=float, default=1.0, help="distill: weight of the attention JSD")
    parser.add_argument("--lambda-rl", type=float, default=0.0, help="distill/kd: weight of the GRPO term")
    parser.add_argument("--student-heads", type=int, default=None, help="distill/kd: student attention heads")
    parser.add_argument("--student-kv-heads", type=int, default=None)
    parser.add_argument("--kl-chunk", type=int, default=1024, help="tokens per chunk of the reverse KL")


def cmd_distill(args) -> int:
    """``ral train --method distill|kd --teacher CKPT``: on-policy (attention) distillation of the
    task's student model from a teacher checkpoint. ``kd`` is ``distill`` with ``gamma_attn = 0``.
    The student starts from the SFT checkpoint when ``--sft-checkpoint`` is given, else from scratch."""
    if not args.teacher:
        raise SystemExit("--method distill|kd needs --teacher CKPT")
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    state = torch.load(args.teacher, map_location="cpu", weights_only=False)
    task = get_task(args.task)
    teacher_task = type(task)(dataclasses.replace(task.cfg, **state["task"])) if "task" in state else task
    teacher = teacher_task.build_model()
    teacher.load_state_dict(state["model"])
    student_cfg = task.cfg
    if getattr(args, "student_heads", None):
        student_cfg = dataclasses.replace(student_cfg, heads=args.student_heads,
                                          kv_heads=args.student_kv_heads or args.student_heads)
    task = type(task)(student_cfg)
    torch.manual_seed(args.seed)
    student = task.build_model()
    if getattr(args, "sft_checkpoint", None):
        student.load_state_dict(torch.load(args.sft_checkpoint, map_location="cpu", weights_only=False)["model"])
    cfg = DistillConfig(lambda_rl=args.lambda_rl, mu=args.mu,
                        gamma_attn=0.0 if args.method == "kd" else args.gamma_attn, chunk_size=args.kl_chunk)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump({"method": args.method, "task": args.task, "teacher": args.teacher,
                   "student": dataclasses.asdict(student_cfg), "distill": dataclasses.asdict(cfg),
                   **{k: v for k, v in vars(args).items() if k != "func"}}, f, indent=1)
    history = train_distill(student, teacher, task, cfg, steps=args.steps, lr=args.lr, seed=args.seed,
                            temperature=args.temperature, eval_prompts=args.eval_prompts,
                            eval_every=args.eval_every, out_dir=args.out, backend=args.backend,
                            prompts_per_step=args.prompts_per_step, group_size=args.group_size)
    torch.save({"model": student.state_dict(), "task": dataclasses.asdict(student_cfg)},
               os.path.join(args.out, "student.pt"))
    print(json.dumps(history[-1]))
    return 0


def _read_metrics(run: str) -> List[dict]:
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(ln) for ln in f if ln.strip()]


def _method(run: str) -> str:
    """The curve label of a run: "grpo", "ral" (lambda_attn 5, the default) or "ral (lambda=X)"."""
    try:
        with open(os.path.join(run, "config.json")) as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return os.path.basename(os.path.normpath(run))
    method = cfg.get("method", os.path.basename(os.path.normpath(run)))
    lam = cfg.get("lambda_attn")
    if method == "ral" and lam is not None and float(lam) != 5.0:
        return f"ral (lambda={float(lam):g})"
    return method


def _sft_eval(run: str) -> dict:
    try:
        with open(os.path.join(run, "config.json")) as f:
            return json.load(f).get("sft") or {}
    except (OSError, ValueError):
        return {}


def _smooth(values, window):
    out = []
    for i in range(len(values)):
        chunk = [v for v in values[max(0, i - window + 1):i + 1] if v is not None]
        out.append(sum(chunk) / len(chunk) if chunk else None)
    return out


def summarize(runs: List[Tuple[str, List[dict]]], metrics: List[str], tail: int = 10) -> dict:
    """Per method: per-run curves, and across runs the mean of each metric over the last ``tail`` steps.
    ``runs``: (run directory, its metrics.jsonl rows) pairs (``_read_metrics``)."""
    by_method: dict = {}
    for run, rows in runs:
        curves = {m: [[r["step"], r[m]] for r in rows if m in r] for m in metrics}
        start = _sft_eval(run)           # the SFT checkpoint's greedy eval = step 0 of eval_* curves
        for m in metrics:
            if m.startswith("eval_") and m[5:] in start:
                curves[m].insert(0, [0, start[m[5:]]])
        by_method.setdefault(_method(run), []).append({"run": run, "curves": curves})
    summary = {}
    for method, items in by_method.items():
        entry = {"runs": [it["run"] for it in items], "final": {}}
        for m in metrics:
            finals = []
            for it in items:
                vals = [v for _, v in it["curves"][m]]
                if vals:
                    finals.append(sum(vals[-tail:]) / len(vals[-tail:]) if not m.startswith("eval_") else vals[-1])
            if finals:
                entry["final"][m] = {"mean": statistics.fmean(finals),
                                     "std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
                                     "per_run": finals}
            first = [it["curves"][m][0][1] for it in items if it["curves"][m]]
            if first:
                entry.setdefault("initial", {})[m] = statistics.fmean(first)
        summary[method] = entry
    return {"methods": summary, "per_run": by_method, "tail_steps": tail}


def _attention_metrics(runs: List[Tuple[str, List[dict]]], spec: str) -> List[str]:
    """The metrics of the attention-statistics figure: ``spec`` split on commas, or for "auto"
    ``ral/attn_entropy`` and every ``ral/attn_mass/<segment>`` that some run logged."""
    if spec != "auto":
        return [m for m in spec.split(",") if m]
    keys = set()
    for _, rows in runs:
        for row in rows:
            keys.update(k for k in row if k == "ral/attn_entropy" or k.startswith("ral/attn_mass/"))
    return sorted(keys, key=lambda k: (k != "ral/attn_entropy", k))


def _plot(result: dict, metrics: List[str], path: str, smooth: int) -> None:
    """One panel per metric: every run thin, the mean over each method's runs thick -> PNG ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    colours = {"grpo": "tab:blue", "ral": "tab:red"}
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        window = 1 if m.startswith("eval_") else smooth
        for method, items in result["per_run"].items():
            colour = colours.get(method)          # other labels: matplotlib's colour cycle
            series = [it["curves"][m] for it in items if it["curves"][m]]
            for k, s in enumerate(series):
                ax.plot([x for x, _ in s], _smooth([y for _, y in s], window), color=colour, alpha=0.35, lw=1)
            if series:
                n = min(len(s) for s in series)
                mean = [sum(s[i][1] for s in series) / len(series) for i in range(n)]
                ax.plot([x for x, _ in series[0][:n]], _smooth(mean, window), color=colour, lw=2.2,
                        label=f"{method} (n={len(series)})")
        ax.set_title(m)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cmd_compare(args) -> int:
    metrics = [m for m in args.metrics.split(",") if m]
    runs = [(run, _read_metrics(run)) for run in args.runs]  # each metrics.jsonl read once
    result = summarize(runs, metrics)
    _plot(result, metrics, args.out, args.smooth)
    written = [args.out]
    attn_metrics = _attention_metrics(runs, args.attn_metrics)
    if attn_metrics:            # the attention statistics: a second figure, and "attention" in the JSON
        result["attention"] = summarize(runs, attn_metrics)
        attn_png = os.path.splitext(args.out)[0] + "-attention.png"
        _plot(result["attention"], attn_metrics, attn_png, args.smooth)
        written.append(attn_png)
    json_path = os.path.splitext(args.out)[0] + ".json"
    with open(json_path, "w") as f:
        json.dump(result, f, indent=1)
    for part in (result, result.get("attention")):
        for method, entry in (part or {"methods": {}})["methods"].items():
            finals = ", ".join(f"{m}={v['mean']:.4g}±{v['std']:.2g}" for m, v in entry["final"].items())
            print(f"{method}: {finals}")
    print(f"wrote {' and '.join(written + [json_path])}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "train":
        return cmd_train(args)
    return cmd_compare(args)


if __name__ == "__main__":
    sys.exit(main())
