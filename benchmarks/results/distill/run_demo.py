"""On-policy distillation demo on the grounding task: KD vs KD + attention distillation.

1. Teacher: TinyVLM hidden 128, 3 layers, 8 heads / 4 kv heads, SFT on the task to high accuracy.
   Student: hidden 64, 2 layers, 2 heads / 1 kv head (a different head count and head dim), a
   short SFT warm-up (format learned, low accuracy). Both checkpoints go under ``--work``
   (git-ignored ``runs/``), made once and reused.
2. From that one student checkpoint, for every seed, the public CLI:

       ral train --method kd      --teacher T.pt --sft-checkpoint S.pt --student-heads 2 --student-kv-heads 1 ...
       ral train --method distill --teacher T.pt --sft-checkpoint S.pt --student-heads 2 --student-kv-heads 1 ...

   (``kd``: mu = 1, gamma_attn = 0; ``distill``: mu = 1, gamma_attn = 1; RL term off), at most
   ``--jobs`` processes at once, one thread each. Same seed = same prompts every step.
3. Analysis of every final student (and the start checkpoint) on the 512 fixed eval prompts with
   the correct response teacher-forced (the same tokens for every model): last-layer, head-mean,
   self-excluded attention JSD to the teacher (mean over the response rows, and at the ``<ans>``
   row that predicts the answer), and the attention mass on the target cell at the ``<ans>`` row.

Writes ``distill_demo.json`` and ``distill_demo.png`` next to this file.

    PYTHONPATH=. python benchmarks/results/distill/run_demo.py --seeds 0 1 2 3 4 --steps 300
    PYTHONPATH=. python benchmarks/results/distill/run_demo.py --plot-only     # re-plot from the JSON
"""
import argparse
import dataclasses
import json
import os
import shlex
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
METHODS = ("kd", "distill")
LABELS = {"kd": "KD (token reverse KL)", "distill": "KD + attention distillation"}
COLOURS = {"kd": "tab:blue", "distill": "tab:red"}

# per-step keys kept in the JSON (the full rows stay in each run's metrics.jsonl)
KEEP = ("step", "reward", "accuracy", "token_kl", "attn_jsd", "time_s", "eval_accuracy", "eval_reward")
TEACHER = dict(hidden_size=128, layers=3, heads=8, kv_heads=4, intermediate_size=256)
STUDENT = dict(hidden_size=64, layers=2, heads=2, kv_heads=1, intermediate_size=128)


def sft_checkpoint(path, overrides, steps, lr, seed):
    """Train (or load) an SFT checkpoint of the grounding task with the given model sizes."""
    from ral.train.tasks.grounding import GroundingConfig, GroundingTask
    from ral.train.trainer import evaluate, sft_warmup
    if os.path.exists(path):
        return torch.load(path, map_location="cpu", weights_only=False)
    cfg = GroundingConfig(**overrides)
    task = GroundingTask(cfg)
    torch.manual_seed(seed)
    model = task.build_model()
    t0 = time.time()
    sft_warmup(model, task, steps=steps, lr=lr, seed=seed, progress=False)
    state = {"model": model.state_dict(), "task": dataclasses.asdict(cfg), "eval": evaluate(model, task, 512),
             "sft": {"steps": steps, "lr": lr, "seed": seed, "time_s": time.time() - t0}}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)
    return state


def train_commands(a, t_path, s_path):
    cmds = {}
    for method in METHODS:
        for seed in a.seeds:
            out = os.path.join(a.work, f"{method}-s{seed}")
            cmds[f"{method}/s{seed}"] = (out, [
                "ral", "train", "--task", "grounding", "--method", method, "--teacher", t_path,
                "--sft-checkpoint", s_path, "--student-heads", str(STUDENT["heads"]),
                "--student-kv-heads", str(STUDENT["kv_heads"]), "--mu", "1", "--gamma-attn", str(a.gamma_attn),
                "--lambda-rl", "0", "--steps", str(a.steps), "--prompts-per-step", "16", "--group-size", "4",
                "--lr", str(a.lr), "--eval-every", str(a.eval_every), "--eval-prompts", "512",
                "--seed", str(seed), "--threads", "1", "--no-progress", "--out", out])
    return cmds


def run_all(cmds, jobs):
    """Run the CLI commands, ``jobs`` at a time; skip runs whose student.pt exists."""
    pending = [(k, out, c) for k, (out, c) in cmds.items() if not os.path.exists(os.path.join(out, "student.pt"))]
    running = []
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    while pending or running:
        while pending and len(running) < jobs:
            key, out, cmd = pending.pop(0)
            os.makedirs(out, exist_ok=True)
            log = open(os.path.join(out, "stdout.log"), "w")
            running.append((key, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT),
                            log, time.time()))
            print("start", key, flush=True)
        time.sleep(1.0)
        for item in list(running):
            key, proc, log, t0 = item
            if proc.poll() is not None:
                log.close()
                running.remove(item)
                print(f"done {key} rc={proc.returncode} {time.time() - t0:.0f}s", flush=True)
                if proc.returncode:
                    raise SystemExit(f"{key} failed; see its stdout.log")


@torch.no_grad()
def attention_analysis(teacher, t_task, students, s_task, n=512, seed=10_000):
    """Teacher-forced on the correct responses of the eval prompts: per student, JSD to the teacher
    (response rows, and the <ans> row) and target mass at the <ans> row; the teacher's target mass."""
    from ral.integrations.models import forward_hidden, language_model as _lm
    from ral.integrations.transformers import AttentionPolicy
    from ral.train.tasks.grounding import attention_metrics
    prompts = s_task.sample(n, torch.Generator().manual_seed(seed))
    target = s_task.sft_targets(prompts)
    ids = torch.cat([prompts.input_ids, target], 1)
    mask = torch.cat([prompts.attention_mask, torch.ones_like(target)], 1)
    resp = torch.cat([torch.zeros_like(prompts.attention_mask, dtype=torch.bool),
                      torch.ones_like(target, dtype=torch.bool)], 1)
    p = prompts.input_ids.shape[1]
    rows = torch.full((n,), p, dtype=torch.long)
    tpos = s_task.target_positions(prompts)
    extras = prompts.model_inputs()
    t_pol = AttentionPolicy(_lm(teacher))
    with t_pol.record(attention_mask=mask) as rec:
        forward_hidden(teacher, ids, mask, **extras)
    t_pol.remove()
    ref = rec.reference
    out = {"teacher": {"attn_on_target": attention_metrics(ref.layers[-1], ref.key_padding_mask, rows, tpos)["attn_on_target"]}}
    for name, model in students.items():
        pol = AttentionPolicy(_lm(model))
        with pol.compare(ref, row_mask=resp, attention_mask=mask) as cmp:
            forward_hidden(model, ids, mask, **extras)
        with pol.record(attention_mask=mask) as srec:
            forward_hidden(model, ids, mask, **extras)
        pol.remove()
        div = cmp.div.float()
        m = attention_metrics(srec.reference.layers[-1], srec.reference.key_padding_mask, rows, tpos)
        out[name] = {"attn_jsd_teacher": float(div[resp].mean()), "attn_jsd_teacher_ans_row": float(div[:, p].mean()),
                     "attn_on_target": m["attn_on_target"], "attn_entropy": m["attn_entropy"]}
    return out


def analyse(a, t_state, s_state, cmds):
    from ral.train.tasks.grounding import GroundingConfig, GroundingTask
    t_task, s_task = GroundingTask(GroundingConfig(**t_state["task"])), GroundingTask(GroundingConfig(**s_state["task"]))
    teacher = t_task.build_model()
    teacher.load_state_dict(t_state["model"])
    teacher.eval()
    students = {}
    start = s_task.build_model()
    start.load_state_dict(s_state["model"])
    students["start"] = start.eval()
    runs = {}
    for key, (out, _) in cmds.items():
        m = s_task.build_model()
        m.load_state_dict(torch.load(os.path.join(out, "student.pt"), map_location="cpu", weights_only=False)["model"])
        students[key] = m.eval()
        with open(os.path.join(out, "metrics.jsonl")) as f:
            runs[key] = [{k: v for k, v in json.loads(line).items() if k in KEEP} for line in f]
    attn = attention_analysis(teacher, t_task, students, s_task)
    return runs, attn


def summarise(out):
    """Per method: mean, std and per-seed values of the headline numbers; paired differences."""
    def final(hist, k):
        return [h[k] for h in hist if k in h][-1]

    def tail_mean(hist, k, n=20):
        vals = [h[k] for h in hist if k in h]
        return sum(vals[-n:]) / len(vals[-n:])

    rows = {}
    for method in METHODS:
        keys = [k for k in out["runs"] if k.startswith(method + "/")]
        per = {
            "eval_accuracy_final": [final(out["runs"][k], "eval_accuracy") for k in keys],
            "eval_accuracy_best": [max(h["eval_accuracy"] for h in out["runs"][k] if "eval_accuracy" in h) for k in keys],
            "train_reward_last20": [tail_mean(out["runs"][k], "reward") for k in keys],
            "token_kl_last20": [tail_mean(out["runs"][k], "token_kl") for k in keys],
            "attn_jsd_teacher": [out["attention"][k]["attn_jsd_teacher"] for k in keys],
            "attn_jsd_teacher_ans_row": [out["attention"][k]["attn_jsd_teacher_ans_row"] for k in keys],
            "attn_on_target": [out["attention"][k]["attn_on_target"] for k in keys],
            "step_time_s": [sum(h["time_s"] for h in out["runs"][k] if "time_s" in h)
                            / sum(1 for h in out["runs"][k] if "time_s" in h) for k in keys],
        }
        rows[method] = {m: {"mean": _mean(v), "std": _std(v), "values": v} for m, v in per.items()}
        rows[method]["seeds"] = [int(k.split("/s")[1]) for k in keys]
    paired = {}
    for m in rows["kd"]:
        if m == "seeds":
            continue
        d = [x - y for x, y in zip(rows["distill"][m]["values"], rows["kd"][m]["values"])]
        paired[m] = {"mean": _mean(d), "std": _std(d), "distill_higher": sum(x > 0 for x in d), "n": len(d)}
    return {"methods": rows, "distill_minus_kd": paired}


def _round(obj, digits=4):
    if isinstance(obj, float):
        return float(f"{obj:.{digits}g}")
    if isinstance(obj, dict):
        return {k: _round(v, digits) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_round(v, digits) for v in obj]
    return obj


def _mean(v):
    return sum(v) / len(v)


def _std(v):
    if len(v) < 2:
        return 0.0
    m = _mean(v)
    return (sum((x - m) ** 2 for x in v) / (len(v) - 1)) ** 0.5


def plot(out, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    panels = [("eval_accuracy", "greedy eval accuracy (512 fixed prompts)"),
              ("reward", "train reward (student's own samples, smoothed)"),
              ("token_kl", "token reverse KL to teacher (train, per token)")]
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.6))
    for ax, (metric, title) in zip(axes, panels):
        for method in METHODS:
            keys = [k for k in out["runs"] if k.startswith(method + "/")]
            curves = []
            for k in keys:
                pts = [(h["step"], h[metric]) for h in out["runs"][k] if metric in h]
                steps, vals = map(np.asarray, zip(*pts))
                if metric != "eval_accuracy":
                    w = 9
                    vals = np.convolve(np.pad(vals, (w // 2, w // 2), mode="edge"), np.ones(w) / w, mode="valid")
                curves.append(vals)
                ax.plot(steps, vals, color=COLOURS[method], alpha=0.18, lw=0.8)
            c = np.stack(curves)
            mu, sd = c.mean(0), c.std(0, ddof=1) if len(c) > 1 else np.zeros(c.shape[1])
            ax.plot(steps, mu, color=COLOURS[method], lw=2.2, label=f"{LABELS[method]} (n={len(c)})")
            ax.fill_between(steps, mu - sd, mu + sd, color=COLOURS[method], alpha=0.15)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("distillation step")
        ax.grid(alpha=0.3)
    teacher_acc = out["teacher"]["eval"]["accuracy"]
    start_acc = out["student"]["start_eval"]["accuracy"]
    axes[0].axhline(teacher_acc, color="k", ls="--", lw=1, label=f"teacher ({teacher_acc:.2f})")
    axes[0].axhline(start_acc, color="gray", ls=":", lw=1, label=f"student start ({start_acc:.2f})")
    axes[0].set_ylabel("accuracy")
    axes[0].set_ylim(0, 1.02)
    axes[1].set_ylim(0, 1.0)
    axes[2].set_ylim(bottom=0)
    axes[0].legend(fontsize=8, loc="upper left")
    # final attention: JSD to teacher and target mass, per seed (dots) and mean (bar)
    ax = axes[3]
    s = out["summary"]["methods"]
    att = out["attention"]
    metrics = [("attn_jsd_teacher", "JSD to teacher\n(response rows)"),
               ("attn_jsd_teacher_ans_row", "JSD to teacher\n(<ans> row)"),
               ("attn_on_target", "mass on target cell\n(<ans> row)")]
    x = np.arange(len(metrics))
    width = 0.26
    ax.bar(x - width, [att["start"][m] for m, _ in metrics], width, color="gray", alpha=0.6, label="student start")
    for j, method in enumerate(METHODS):
        ax.bar(x + j * width, [s[method][m]["mean"] for m, _ in metrics], width, color=COLOURS[method], alpha=0.6,
               yerr=[s[method][m]["std"] for m, _ in metrics], capsize=3, label=LABELS[method])
        for i, (m, _) in enumerate(metrics):
            ax.scatter([x[i] + j * width] * len(s[method][m]["values"]), s[method][m]["values"], color="k", s=6, zorder=3)
    ax.hlines(att["teacher"]["attn_on_target"], x[2] - 1.6 * width, x[2] + 1.6 * width, color="k", ls="--", lw=1.2,
              label="teacher (mass on target)")
    ax.set_xticks(x, [lbl for _, lbl in metrics], fontsize=8)
    ax.set_ylim(0, max(0.6, att["teacher"]["attn_on_target"] * 1.25))
    ax.set_title("final last-layer attention (head mean, teacher-forced)", fontsize=10)
    ax.legend(fontsize=7, loc="upper center", ncol=2)
    ax.grid(alpha=0.3, axis="y")
    t, st = out["teacher"]["config"], out["student"]["config"]
    fig.suptitle(f"On-policy distillation on the grounding task: teacher {t['hidden_size']}d/{t['layers']}L/"
                 f"{t['heads']}h/{t['kv_heads']}kv -> student {st['hidden_size']}d/{st['layers']}L/{st['heads']}h/"
                 f"{st['kv_heads']}kv; mean ± std over seeds (thin: each seed)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--teacher-sft-steps", type=int, default=1000)
    p.add_argument("--teacher-sft-lr", type=float, default=1e-3)
    p.add_argument("--student-sft-steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--gamma-attn", type=float, default=1.0)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--work", default=os.path.join(ROOT, "runs", "distill_demo"))
    p.add_argument("--out-name", default="distill_demo", help="JSON / PNG name next to this file")
    p.add_argument("--plot-only", action="store_true")
    a = p.parse_args()
    json_path, png_path = os.path.join(HERE, a.out_name + ".json"), os.path.join(HERE, a.out_name + ".png")
    if a.plot_only:
        with open(json_path) as f:
            plot(json.load(f), png_path)
        return
    torch.set_num_threads(1)
    t0 = time.time()
    t_path = os.path.join(a.work, f"teacher-sft{a.teacher_sft_steps}.pt")
    s_path = os.path.join(a.work, f"student-sft{a.student_sft_steps}.pt")
    t_state = sft_checkpoint(t_path, TEACHER, a.teacher_sft_steps, a.teacher_sft_lr, seed=100)
    print("teacher", t_state["eval"], f"{time.time() - t0:.0f}s", flush=True)
    s_state = sft_checkpoint(s_path, STUDENT, a.student_sft_steps, 2e-3, seed=200)
    print("student start", s_state["eval"], f"{time.time() - t0:.0f}s", flush=True)
    cmds = train_commands(a, t_path, s_path)
    run_all(cmds, a.jobs)
    t_train = time.time()
    runs, attn = analyse(a, t_state, s_state, cmds)
    out = {"teacher": {"config": t_state["task"], "eval": t_state["eval"], "sft": t_state.get("sft")},
           "student": {"config": s_state["task"], "start_eval": s_state["eval"], "sft": s_state.get("sft")},
           "args": {k: v for k, v in vars(a).items() if k != "work"},
           "commands": {k: " ".join(shlex.quote(x) for x in c).replace(ROOT + os.sep, "")   # repo-relative
                        for k, (_, c) in cmds.items()},
           "attention": attn, "runs": runs}
    out["summary"] = summarise(out)
    out["wall_s"] = time.time() - t0
    with open(json_path, "w") as f:                 # compact: every step of every run
        json.dump(_round(out), f, separators=(",", ":"))
    plot(out, png_path)
    print(json.dumps(out["summary"], indent=1))
    print(f"analysis {time.time() - t_train:.0f}s, total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    sys.exit(main())
