"""A thin GRPO + RAL trainer (Reinforced Attention Learning, docs/design.md, "Why the op exists").

One step:

1. sample ``prompts_per_step`` prompts from the task, each repeated ``group_size`` (G) times;
2. sample a response per row with ``model.generate`` and score it with ``task.reward``;
3. group-normalised advantages (``ral.losses.group_advantages``);
4. one no-grad pass of the current (= old) weights inside ``AttentionPolicy.record``: the old
   per-token log-probs and the attention reference (post-rotary q, k and row stats of the chosen
   layers); a frozen reference model gives the log-probs of the KL penalty when beta > 0;
5. ``ppo_epochs`` x minibatch updates of ``L_RL + lambda_attn * L_attn`` where L_RL is the GRPO
   clipped token loss (``ral.losses.grpo_token_loss``) and L_attn = sum_t A * JSD(pi_theta^t || pi_old^t)
   (``ral.losses.attention_policy_loss``) computed inside ``AttentionPolicy.compare``; with
   ``attn_entropy_coef`` / ``attn_mass_coef`` (0 by default) plus the attention-statistics loss
   ``ral.losses.attention_stats_loss`` (an entropy bonus, a reward for mass on ``attn_mass_segments``).

Attention statistics (``attn_stats``, or a statistics loss): the same compare call also gives the
entropy of the current attention policy and its mass per key segment (the task's ``segment_names``
and ``key_segments(input_ids)``; the grounding task: text / image); the update logs their token
means over the response rows, averaged over the minibatches, as ``ral/attn_entropy`` and
``ral/attn_mass/<segment>`` (and ``ral/attn_stats_loss``) in ``metrics.jsonl``.

``lambda_attn = 0`` is plain GRPO (the same passes run, so both methods cost the same and report
the same diagnostics). **The attention term has zero gradient while the weights still equal the
old ones** (JSD is minimal, with zero gradient, at pi = pi_old), so with ``ppo_epochs = 1`` and
one minibatch it does nothing (``RALTrainer`` warns): RAL needs more than one update per rollout
(``ppo_epochs > 1`` or several minibatches); the first minibatch of every step only moves the
weights through L_RL.

Checkpoints: ``OUT/checkpoint.pt`` is written every ``save_every`` steps to a temporary file
and renamed over the old one (atomic on POSIX), so an interrupt loses at most the current step.
``train()`` resumes from it; per-step randomness is derived from (seed, step), so a resumed run
continues the same stream. Metrics: one JSON line per step in ``OUT/metrics.jsonl`` (lines past
the checkpoint are dropped on resume). Progress: tqdm.

The model interface (``ral.train.tasks.grounding.TinyVLM`` follows it; so does a plain transformers
causal LM called with ``input_ids``): ``model(input_ids, attention_mask, **extras).logits``,
``model.generate(input_ids, attention_mask, **extras, **sampling)`` and, for the attention policy,
``model.lm`` (or the model itself) is the transformers model. The task interface:
``sample(n, generator)`` -> prompts with ``input_ids``, ``attention_mask``, ``model_inputs()``,
``repeat(g)``; ``reward(completions, prompts)`` -> {"reward": (B,), ...}; ``max_new_tokens``,
``eos_token_id``, ``pad_token_id``; optionally ``target_positions(prompts)`` for the attention
diagnostics (entropy and mass on the target of the first response token's attention policy),
``segment_names`` and ``key_segments(input_ids)`` -> (B, S) ids for the attention statistics.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tqdm.auto import tqdm

from ..backends import BACKENDS
from ..checks import check_choice, check_float, check_int
from ..integrations.models import language_model
from ..integrations.transformers import AttentionPolicy, AttentionReference
from ..losses import (LOSS_TYPES, attention_policy_loss, attention_stats_loss, group_advantages, grpo_token_loss,
                      masked_token_mean)
from ..reference import DIVERGENCES
from .diagnostics import attention_metrics

__all__ = ["TrainConfig", "RALTrainer", "sft_warmup", "evaluate", "completion_mask", "token_logps", "sample_groups",
           "atomic_save"]


@dataclass
class TrainConfig:
    """GRPO + RAL hyper-parameters (paper defaults where they fit a CPU toy: G=8, beta=0.04)."""

    steps: int = 30
    prompts_per_step: int = 8
    group_size: int = 8
    ppo_epochs: int = 2
    minibatch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    beta: float = 0.04
    epsilon_low: float = 0.2
    epsilon_high: Optional[float] = None
    loss_type: str = "grpo"
    scale_rewards: bool = True
    temperature: float = 1.0
    lambda_attn: float = 0.0
    divergence: str = "jsd"
    attn_layers: Tuple[int, ...] = (-1,)
    backend: str = "auto"
    freeze: Tuple[str, ...] = ("projector",)
    seed: int = 0
    save_every: int = 1
    eval_prompts: int = 0          # > 0: greedy accuracy on this many fixed prompts every eval_every steps
    eval_every: int = 10
    attn_stats: bool = False       # log ral/attn_entropy and ral/attn_mass/<segment> (cpu / reference backends)
    attn_entropy_coef: float = 0.0  # statistics loss: - coef * entropy (an entropy bonus)
    attn_mass_coef: float = 0.0     # statistics loss: - coef * mass on attn_mass_segments
    attn_mass_segments: Tuple[int, ...] = (1,)   # segment ids (the grounding task: 1 = image)
    extra: Dict = field(default_factory=dict)

    def __post_init__(self):
        """ValueError naming the field for a value the trainer cannot run with (or would run with and
        learn nothing: a group of one sample has every advantage 0, zero epochs no update)."""
        for name, least in (("steps", 0), ("prompts_per_step", 1), ("group_size", 2), ("ppo_epochs", 1),
                            ("minibatch_size", 1), ("save_every", 1), ("eval_prompts", 0), ("eval_every", 1)):
            check_int(name, getattr(self, name), least)
        for name, bound in (("lr", ">= 0"), ("weight_decay", ">= 0"), ("beta", ">= 0"), ("epsilon_low", ">= 0"),
                            ("lambda_attn", ">= 0"), ("temperature", "> 0"), ("max_grad_norm", "> 0"),
                            ("attn_entropy_coef", ""), ("attn_mass_coef", "")):
            check_float(name, getattr(self, name), bound)
        if self.epsilon_high is not None:
            check_float("epsilon_high", self.epsilon_high, ">= 0")
        for name, choices in (("loss_type", LOSS_TYPES), ("divergence", DIVERGENCES), ("backend", BACKENDS)):
            check_choice(name, getattr(self, name), choices)


def atomic_save(obj, path: str) -> None:
    """torch.save to ``path.tmp`` then rename over ``path``: readers see the old or the new file."""
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def completion_mask(completions: Tensor, eos_token_id: int) -> Tensor:
    """(B, T) ids -> (B, T) bool: True up to and including the first EOS."""
    is_eos = completions == eos_token_id
    after = (is_eos.cumsum(1) - is_eos.long()) > 0       # strictly after the first EOS
    return ~after


def token_logps(logits: Tensor, completions: Tensor, temperature: float = 1.0) -> Tensor:
    """Log-probs of the completion tokens. logits (B, S, V) over prompt+completion -> (B, T)."""
    t = completions.shape[1]
    lg = logits[:, -t - 1:-1].float() / temperature
    return torch.gather(F.log_softmax(lg, -1), 2, completions[..., None]).squeeze(-1)


def _new_tokens(out: Tensor, input_ids: Tensor) -> Tensor:
    if out.shape[1] >= input_ids.shape[1] and torch.equal(out[:, :input_ids.shape[1]], input_ids):
        return out[:, input_ids.shape[1]:]
    return out


def sample_completions(model, prompts, task, temperature: float = 1.0, greedy: bool = False) -> Tensor:
    """(B, T=max_new_tokens) sampled tokens, PAD after the first EOS."""
    kwargs = dict(max_new_tokens=task.max_new_tokens, eos_token_id=task.eos_token_id,
                  pad_token_id=task.pad_token_id)
    kwargs.update(dict(do_sample=False) if greedy else
                  dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0))
    was_training = model.training
    model.eval()
    out = _new_tokens(model.generate(prompts.input_ids, prompts.attention_mask, **prompts.model_inputs(),
                                     **kwargs), prompts.input_ids)
    model.train(was_training)
    if out.shape[1] < task.max_new_tokens:
        out = F.pad(out, (0, task.max_new_tokens - out.shape[1]), value=task.pad_token_id)
    mask = completion_mask(out, task.eos_token_id)
    return torch.where(mask, out, torch.full_like(out, task.pad_token_id))


@torch.no_grad()
def sample_groups(model, task, n_prompts: int, group_size: int, seed: int, step: int, temperature: float):
    """One rollout: ``n_prompts`` prompts each repeated ``group_size`` times, sampled and scored.

    Randomness is derived from (seed, step) alone: the prompts from a generator seeded with it, the
    sampling from torch's global seed set to it, so a resumed run or another method with the same
    seed sees the same prompts. Returns (prompts, completions (B, T), completion mask (B, T) bool,
    scores {name: (B,)}, input ids (B, P + T), attention mask (B, P + T)).
    """
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    prompts = task.sample(n_prompts, gen).repeat(group_size)
    torch.manual_seed(seed * 1_000_003 + step)
    comp = sample_completions(model, prompts, task, temperature)
    cmask = completion_mask(comp, task.eos_token_id)
    scores = task.reward(comp, prompts)
    ids = torch.cat([prompts.input_ids, comp], 1)
    mask = torch.cat([prompts.attention_mask, cmask.to(prompts.attention_mask.dtype)], 1)
    return prompts, comp, cmask, scores, ids, mask


def evaluate(model, task, n: int = 256, seed: int = 10_000, greedy: bool = True) -> Dict[str, float]:
    """Mean reward / accuracy / format on ``n`` fixed prompts (greedy by default)."""
    prompts = task.sample(n, torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)
    comp = sample_completions(model, prompts, task, greedy=greedy)
    return {k: float(v.mean()) for k, v in task.reward(comp, prompts).items()}


def sft_warmup(model, task, steps: int = 200, batch_size: int = 64, lr: float = 1e-3, seed: int = 0,
               progress: bool = True) -> Dict[str, float]:
    """Supervised warm-up on the task's correct responses (teacher forcing, response tokens only)."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    gen = torch.Generator().manual_seed(seed)
    loss = torch.zeros(())
    for _ in tqdm(range(steps), desc="sft", disable=not progress, leave=False):
        prompts = task.sample(batch_size, gen)
        target = task.sft_targets(prompts)
        ids = torch.cat([prompts.input_ids, target], 1)
        mask = torch.cat([prompts.attention_mask, torch.ones_like(target)], 1)
        logits = model(ids, mask, **prompts.model_inputs()).logits
        loss = -token_logps(logits, target).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return {"sft_loss": float(loss.detach())}


class RALTrainer:
    """GRPO (``lambda_attn = 0``) or GRPO + RAL (``lambda_attn > 0``) on a task; see module doc.

    Args:
        model: the policy (trained in place).
        task: the task (prompts + reward).
        config: ``TrainConfig``.
        out_dir: checkpoints and ``metrics.jsonl``; resumed from when it holds a checkpoint.
        ref_model: frozen model for the k3 KL penalty (needed when ``config.beta > 0``).
    """

    def __init__(self, model: nn.Module, task, config: TrainConfig, out_dir: str,
                 ref_model: Optional[nn.Module] = None):
        self.model, self.task, self.cfg, self.out_dir = model, task, config, out_dir
        self.ref_model = ref_model
        if config.beta != 0 and ref_model is None:
            raise ValueError("ref_model: required when beta != 0")
        if ref_model is not None:
            ref_model.eval().requires_grad_(False)
        for name, p in model.named_parameters():
            if any(name.startswith(prefix) for prefix in config.freeze):
                p.requires_grad_(False)
        if config.lambda_attn > 0 and config.ppo_epochs == 1 \
                and config.minibatch_size >= config.prompts_per_step * config.group_size:
            warnings.warn("lambda_attn > 0 with ppo_epochs = 1 and one minibatch per step: the only update of a "
                          "rollout is taken at its own weights, where the attention term's gradient is zero",
                          UserWarning, stacklevel=2)
        self._stats_loss = bool(config.attn_entropy_coef or config.attn_mass_coef)
        self._segment_names = getattr(task, "segment_names", None) if hasattr(task, "key_segments") else None
        if config.attn_mass_coef and self._segment_names is None:
            raise ValueError("attn_mass_coef: the task gives no key segments (segment_names, key_segments)")
        if config.attn_mass_coef and not (config.attn_mass_segments and all(
                isinstance(i, int) and 0 <= i < len(self._segment_names) for i in config.attn_mass_segments)):
            raise ValueError(f"attn_mass_segments: must be segment ids of the task's {self._segment_names}, "
                             f"got {config.attn_mass_segments!r}")
        self.policy = AttentionPolicy(language_model(model), layers=config.attn_layers, divergence=config.divergence,
                                      backend=config.backend, stats=config.attn_stats or self._stats_loss,
                                      segment_names=self._segment_names)
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        self.step = 0
        os.makedirs(out_dir, exist_ok=True)
        self.ckpt_path = os.path.join(out_dir, "checkpoint.pt")
        self.metrics_path = os.path.join(out_dir, "metrics.jsonl")

    # -- checkpoints ------------------------------------------------------------------------------
    def save(self) -> None:
        atomic_save({"step": self.step, "model": self.model.state_dict(),
                     "optimizer": self.optimizer.state_dict(), "config": asdict(self.cfg)}, self.ckpt_path)

    def maybe_resume(self) -> bool:
        """Load ``checkpoint.pt`` if present and drop metrics lines past it. True if resumed."""
        if not os.path.exists(self.ckpt_path):
            if os.path.exists(self.metrics_path):
                os.remove(self.metrics_path)
            return False
        state = torch.load(self.ckpt_path, map_location="cpu", weights_only=False)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = state["step"]
        if os.path.exists(self.metrics_path):
            with open(self.metrics_path) as f:
                lines = [ln for ln in f if ln.strip() and json.loads(ln)["step"] <= self.step]
            tmp = self.metrics_path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(lines)
            os.replace(tmp, self.metrics_path)
        return True

    # -- one step -----------------------------------------------------------------------------------
    def _forward(self, model, ids, mask, extras) -> Tensor:
        return model(ids, mask, **extras).logits

    def rollout(self) -> dict:
        """Sample, score, and run the old-policy pass. Returns the batch for the updates."""
        cfg, task = self.cfg, self.task
        prompts, comp, cmask, scores, ids, mask = sample_groups(self.model, task, cfg.prompts_per_step,
                                                                cfg.group_size, cfg.seed, self.step, cfg.temperature)
        adv = group_advantages(scores["reward"], cfg.group_size, scale=cfg.scale_rewards)
        extras = prompts.model_inputs()
        self.model.eval()
        with torch.no_grad():
            with self.policy.record() as rec:
                old_logps = token_logps(self._forward(self.model, ids, mask, extras), comp, cfg.temperature)
            ref_logps = None
            if cfg.beta != 0:
                ref_logps = token_logps(self._forward(self.ref_model, ids, mask, extras), comp, cfg.temperature)
        self.model.train()
        segments = self.task.key_segments(ids) if self.policy.stats and self._segment_names is not None else None
        batch = dict(prompts=prompts, comp=comp, cmask=cmask, ids=ids, mask=mask, extras=extras, adv=adv,
                     old_logps=old_logps, ref_logps=ref_logps, reference=rec.reference, scores=scores,
                     segments=segments)
        return batch

    def _attention_diagnostics(self, batch) -> Dict[str, float]:
        if not hasattr(self.task, "target_positions"):
            return {}
        ref: AttentionReference = batch["reference"]
        rows = torch.full((batch["ids"].shape[0],), batch["prompts"].input_ids.shape[1], dtype=torch.long)
        return attention_metrics(ref.layers[-1], ref.key_padding_mask, rows,
                                 self.task.target_positions(batch["prompts"]))

    def attention_loss(self, batch, idx: Tensor, cmp, cmask: Tensor) -> Tensor:
        """The term weighted by ``lambda_attn`` on minibatch ``idx``: RAL's sum_t A * D(pi_theta^t || pi_old^t)
        (``cmp`` is the ``Comparison`` of this minibatch's forward). Subclasses swap in controls."""
        return attention_policy_loss(cmp.div, batch["adv"][idx], cmask, loss_type=self.cfg.loss_type,
                                     max_completion_length=self.task.max_new_tokens)

    def before_backward(self, rl_loss: Tensor, attn: Tensor) -> None:
        """Called with both loss terms of each minibatch before ``backward`` (a hook for diagnostics)."""

    def update(self, batch) -> Dict[str, float]:
        """ppo_epochs x minibatches of L_RL + lambda_attn * L_attn. Returns averaged metrics."""
        cfg = self.cfg
        n = batch["ids"].shape[0]
        gen = torch.Generator().manual_seed(cfg.seed * 7_919 + self.step)
        sums: Dict[str, float] = {}
        count = 0
        for _ in range(cfg.ppo_epochs):
            perm = torch.randperm(n, generator=gen)
            for start in range(0, n, cfg.minibatch_size):
                idx = perm[start:start + cfg.minibatch_size]
                extras = {k: v[idx] for k, v in batch["extras"].items()}
                cmask = batch["cmask"][idx]
                segments = None if batch.get("segments") is None else batch["segments"][idx]
                with self.policy.compare(batch["reference"][idx], row_mask=cmask, key_segments=segments) as cmp:
                    logits = self._forward(self.model, batch["ids"][idx], batch["mask"][idx], extras)
                logps = token_logps(logits, batch["comp"][idx], cfg.temperature)
                rl = grpo_token_loss(logps, batch["old_logps"][idx], batch["adv"][idx], cmask,
                                     ref_logps=None if batch["ref_logps"] is None else batch["ref_logps"][idx],
                                     beta=cfg.beta, epsilon_low=cfg.epsilon_low, epsilon_high=cfg.epsilon_high,
                                     loss_type=cfg.loss_type, max_completion_length=self.task.max_new_tokens)
                attn = self.attention_loss(batch, idx, cmp, cmask)
                loss = rl.loss + cfg.lambda_attn * attn if cfg.lambda_attn else rl.loss
                if self._stats_loss:
                    stats_loss = attention_stats_loss(
                        cmp.entropy, cmp.mass, cmask, entropy_coef=cfg.attn_entropy_coef, mass_coef=cfg.attn_mass_coef,
                        segments=cfg.attn_mass_segments, loss_type=cfg.loss_type,
                        max_completion_length=self.task.max_new_tokens)
                    loss = loss + stats_loss
                self.before_backward(rl.loss, attn)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                gnorm = torch.nn.utils.clip_grad_norm_(
                    [p for p in self.model.parameters() if p.requires_grad], cfg.max_grad_norm)
                self.optimizer.step()
                div_tok = float(masked_token_mean(cmp.div.detach()[:, -cmask.shape[1]:], cmask))
                vals = {"loss": float(loss.detach()), "loss_rl": float(rl.loss.detach()), "loss_attn": float(attn.detach()),
                        "attn_jsd": div_tok, "clip_ratio": float(rl.clip_ratio), "grad_norm": float(gnorm)}
                if rl.kl is not None:
                    vals["kl"] = float(masked_token_mean(rl.kl.detach(), cmask))
                if self.policy.stats:
                    vals.update(self._statistics_metrics(cmp, cmask))
                    if self._stats_loss:
                        vals["ral/attn_stats_loss"] = float(stats_loss.detach())
                for k, v in vals.items():
                    sums[k] = sums.get(k, 0.0) + v
                count += 1
        return {k: v / max(count, 1) for k, v in sums.items()}

    @staticmethod
    def _statistics_metrics(cmp, cmask: Tensor) -> Dict[str, float]:
        """Token means over the response rows ``cmask`` (B, T) of the compare call's entropy and per-segment mass."""
        names, columns = cmp.statistics_columns()
        columns = columns.detach()[:, -cmask.shape[1]:]
        means = torch.stack([masked_token_mean(columns[..., i], cmask) for i in range(len(names))]).tolist()
        return dict(zip(names, means))

    def train_step(self) -> Dict[str, float]:
        t0 = time.time()
        batch = self.rollout()
        metrics = {"step": self.step + 1}
        metrics.update({k: float(v.mean()) for k, v in batch["scores"].items()})
        metrics["completion_length"] = float(batch["cmask"].float().sum(1).mean())
        metrics.update(self._attention_diagnostics(batch))
        metrics.update(self.update(batch))
        metrics["time_s"] = time.time() - t0
        return metrics

    def train(self, progress: bool = True) -> list:
        """Run (or resume) to ``config.steps``. Returns the metrics of the steps run now."""
        self.maybe_resume()
        history = []
        bar = tqdm(total=self.cfg.steps, initial=self.step, disable=not progress,
                   desc=f"{'ral' if self.cfg.lambda_attn else 'grpo'} seed {self.cfg.seed}")
        while self.step < self.cfg.steps:
            metrics = self.train_step()
            self.step += 1
            if self.cfg.eval_prompts and (self.step % self.cfg.eval_every == 0 or self.step == self.cfg.steps):
                metrics.update({f"eval_{k}": v for k, v in
                                evaluate(self.model, self.task, self.cfg.eval_prompts).items()})
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(metrics) + "\n")
            if self.step % self.cfg.save_every == 0 or self.step == self.cfg.steps:
                self.save()
            history.append(metrics)
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['reward']:.3f}", acc=f"{metrics['accuracy']:.2f}")
        bar.close()
        return history
