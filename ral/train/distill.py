"""On-policy (attention) distillation on an embedded task: ``ral train --method distill|kd``.

Each step the student samples, the teacher scores the student's own tokens
(:func:`ral.integrations.distill.teacher_pass`) and the student takes one AdamW step on
:func:`ral.integrations.distill.distill_loss`.
"""

from __future__ import annotations

import json
import os
import time
from typing import Optional

import torch

from ..checks import check_float, check_int
from ..integrations.distill import DistillConfig, distill_loss, teacher_pass
from ..integrations.models import language_model, lm_head_params
from ..integrations.transformers import AttentionPolicy
from ..losses import group_advantages, reduce_tokens
from .trainer import evaluate, sample_groups

__all__ = ["train_distill"]


def train_distill(student: torch.nn.Module, teacher: torch.nn.Module, task, cfg: DistillConfig, *,
                  steps: int = 100, prompts_per_step: int = 16, group_size: int = 4, lr: float = 3e-4,
                  seed: int = 0, temperature: float = 1.0, eval_prompts: int = 512, eval_every: int = 10,
                  out_dir: Optional[str] = None, backend: str = "auto", progress: bool = False) -> list:
    """On-policy distillation on ``task``: each step the student samples ``prompts_per_step x
    group_size`` responses, the teacher scores them (:func:`teacher_pass`), and the student takes
    one AdamW step on :func:`distill_loss`. The RL term (``cfg.lambda_rl``) is GRPO on the task
    reward with group advantages (on-policy, one update per rollout: ratio 1, no clipping).
    Metrics (JSONL in ``out_dir/metrics.jsonl`` when given): reward, accuracy, token_kl, attn_jsd,
    and every ``eval_every`` steps the greedy ``eval_accuracy`` on ``eval_prompts`` fixed prompts.
    """
    for name, value, least in (("steps", steps, 0), ("prompts_per_step", prompts_per_step, 1),
                               ("group_size", group_size, 2 if cfg.lambda_rl > 0 else 1),
                               ("eval_prompts", eval_prompts, 0), ("eval_every", eval_every, 1)):
        check_int(name, value, least)       # group_size 1 would give the GRPO term advantages of 0
    check_float("lr", lr, ">= 0")
    check_float("temperature", temperature, "> 0")
    teacher.eval().requires_grad_(False)
    s_policy = AttentionPolicy(language_model(student), backend=backend) if cfg.gamma_attn > 0 else None
    t_policy = AttentionPolicy(language_model(teacher), backend=backend) if cfg.gamma_attn > 0 else None
    head_t = lm_head_params(teacher)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=lr)
    history = []
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    log = open(os.path.join(out_dir, "metrics.jsonl"), "w") if out_dir else None
    try:
        for step in range(steps + 1):
            row = {"step": step}
            if eval_prompts and (step % eval_every == 0 or step == steps):
                ev = evaluate(student, task, eval_prompts)
                row.update({f"eval_{k}": v for k, v in ev.items()})
            if step == steps:
                history.append(row)
                break
            t0 = time.time()
            prompts, comp, cmask, scores, ids, mask = sample_groups(student, task, prompts_per_step, group_size,
                                                                    seed, step, temperature)
            resp = torch.cat([torch.zeros_like(prompts.attention_mask, dtype=torch.bool), cmask], 1)
            extras = prompts.model_inputs()
            tout = teacher_pass(teacher, ids, mask, resp, cfg, teacher_policy=t_policy, **extras) \
                if cfg.needs_teacher else None
            rl_fn = None
            if cfg.lambda_rl > 0:
                adv = group_advantages(scores["reward"], group_size)
                pred = resp[:, 1:]

                def rl_fn(logps, adv=adv, pred=pred):      # on-policy GRPO: -A * logp, token mean per response
                    return reduce_tokens(-adv[:, None] * logps, pred, "grpo")
            student.train()
            loss, m = distill_loss(student, tout, ids, mask, resp, cfg, student_policy=s_policy,
                                   teacher_head=head_t, rl_loss_fn=rl_fn, **extras)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            opt.step()
            row.update({k: float(v.float().mean()) for k, v in scores.items()})
            row.update({k: v for k, v in m.items() if v == v})
            row.update(loss=float(loss.detach()), time_s=time.time() - t0)
            history.append(row)
            if log:
                log.write(json.dumps(row) + "\n")
                log.flush()
        if log and history and history[-1]["step"] == steps:
            log.write(json.dumps(history[-1]) + "\n")
    finally:
        if log:
            log.close()
        for pol in (s_policy, t_policy):
            if pol is not None:
                pol.remove()
    return history
