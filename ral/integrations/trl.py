"""TRL integration: ``RALGRPOTrainer``, TRL's ``GRPOTrainer`` with RAL's attention term
(and, optionally, on-policy distillation from a teacher).

Supported TRL: ``trl>=1.16,<1.17`` (the hooks below are private methods of ``GRPOTrainer``:
``_generate_and_score_completions`` and ``_compute_loss``; they are checked on import).

    from ral.integrations.trl import RALGRPOTrainer
    trainer = RALGRPOTrainer(model=model, reward_funcs=reward_fn, args=GRPOConfig(...),
                             train_dataset=ds, processing_class=tok, lambda_attn=1.0)
    trainer.train()

What it adds to ``GRPOTrainer``:

- **Record.** After TRL generates and scores a generation batch (where it computes the old
  per-token log-probs), one no-grad backbone pass of the current (= rollout-time, old) weights
  caches the chosen layers' post-rotary q, k and row statistics (``AttentionPolicy.record``). They
  travel in the batch dict (``ral_q{i}``, ``ral_k{i}``, ``ral_stats{i}``), so TRL's shuffling,
  splitting into ``steps_per_generation`` micro-batches and buffering for ``num_iterations``
  apply to them unchanged.
- **Compare.** ``_compute_loss`` runs TRL's own loss with the chosen layers in compare mode: the
  same forward yields TRL's per-token log-probs and the per-token attention divergence
  ``div`` (B, C) to the reference. It adds ``lambda_attn · L_attn`` with
  ``L_attn = agg(A · div)``, where ``agg`` is *exactly* TRL's aggregation for the configured
  ``loss_type`` (grpo/sapo: per-sequence mean then batch mean; bnpo: token mean; dr_grpo: sum over
  B · max_completion_length; dapo/cispo/vespo: sum over ``num_items_in_batch``; luspo), scaled for
  gradient accumulation the same way. A > 0 pulls the attention towards the old policy's, A < 0
  pushes it away (paper Eq. 3).
- **Metrics.** ``ral/attn_div`` (token mean of div over the completion mask), ``ral/attn_loss``,
  and with a teacher ``ral/token_kl``, ``ral/teacher_attn_jsd``; logged with TRL's metrics
  (averaged over the logging window and over processes).
- **Attention statistics** (``attn_stats=True``, or a non-zero ``attn_entropy_coef`` /
  ``attn_mass_coef``). The loss forward's chosen layers also return the entropy of the current
  attention policy and its mass per key segment, from the same op call (``AttentionPolicy(stats=True)``;
  with no reference to compare with, ``AttentionPolicy.observe``: no record pass either). Segments:
  text / image / video from the VLM config's ``image_token_id`` / ``video_token_id`` (Qwen2.5-VL),
  or ``attn_segment_names`` with ``attn_segments`` (a function of the (B, P + C) input ids giving
  the ids). Logged: ``ral/attn_entropy`` and ``ral/attn_mass/<segment>``, token means over the
  completion mask (layer mean over ``attn_layers``), aggregated over processes like ``ral/attn_div``.
  The loss ``attn_entropy_coef`` / ``attn_mass_coef`` (off by default) adds
  ``agg(- attn_entropy_coef · entropy - attn_mass_coef · mass[attn_mass_segments])``
  (``ral.losses.attention_stats_token_loss``; TRL's aggregation, not advantage-weighted) and logs
  ``ral/attn_stats_loss``: an entropy bonus and a reward for attention on the visual tokens,
  beside the RAL term or, with ``lambda_attn=0``, instead of it.
- ``lambda_attn == 0`` (and no teacher, no ``attach_policy``) leaves the model and the loss
  untouched: the trainer *is* GRPOTrainer (the tests check exact equality of the loss and of the
  trained weights). With ``attach_policy=True`` the attention path runs and the result equals
  GRPOTrainer's within float tolerance (tested too).

The attention term has zero gradient while the weights still equal the rollout weights (JSD is
flat at its minimum), so it only acts from the second optimizer step on a generation batch:
use ``num_iterations > 1`` or ``steps_per_generation > gradient_accumulation_steps`` (the trainer
warns when ``lambda_attn > 0`` has neither).

Distillation (paper Eq. 5-6). Pass ``teacher_model`` and ``distill=DistillConfig(mu, gamma_attn,
lambda_rl)``: the teacher scores the student's own completions once per generation batch (its
final hidden states at the completion rows and, if gamma_attn > 0, its attention reference), and
the loss becomes ``lambda_rl · L_GRPO + mu · agg(KL(p_student || p_teacher)) + gamma_attn ·
agg(JSD(attn_student || attn_teacher))``. The token KL is computed in chunks from hidden states
and LM heads (``ral.lm_head.chunked_reverse_kl``): no B x C x V tensor. With a teacher attention
term the attention reference is the teacher's, so ``lambda_attn`` must be 0. Teacher and student
share the tokenizer; heads, kv heads and head dims may differ.

Multi-GPU: everything distributed is TRL's / accelerate's (DDP, DeepSpeed ZeRO-1/2, FSDP); see
the README (section "Scaling out with TRL") for ``accelerate launch`` with examples/deepspeed_zero2.yaml. With ZeRO-3 the chosen
layers work (DeepSpeed gathers parameters in its module hooks), but the token-KL term reads the
student's LM head weight directly and is not supported there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from typing import Callable, List, Optional, Sequence

import torch
from torch import Tensor

try:
    import trl
    from trl import GRPOTrainer
    from trl.models import prepare_deepspeed, prepare_fsdp
    from trl.models.utils import disable_gradient_checkpointing
except ImportError as exc:  # pragma: no cover - exercised only without trl
    raise ImportError("ral.integrations.trl needs TRL: pip install 'ral[trl]' (trl>=1.16,<1.17)") from exc

from ..checks import check_flag, check_float
from ..lm_head import chunked_reverse_kl
from ..losses import attention_stats_token_loss, reduce_tokens
from .distill import DistillConfig
from .models import backbone, lm_head_params
from .transformers import AttentionPolicy, AttentionReference

__all__ = ["RALGRPOTrainer", "SUPPORTED_TRL", "aggregate_like_trl", "checkpointing_config"]

SUPPORTED_TRL = ">=1.16,<1.17"

for _hook in ("_generate_and_score_completions", "_compute_loss", "_get_per_token_logps_and_entropies"):
    if not hasattr(GRPOTrainer, _hook):  # pragma: no cover
        raise ImportError(f"trl {trl.__version__}: GRPOTrainer has no {_hook}; ral supports trl{SUPPORTED_TRL}")

# Batch keys that TRL's GRPOTrainer forwards to the model besides input ids and the mask.
_MODEL_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes", "token_type_ids",
               "mm_token_type_ids", "image_position_ids", "spatial_shapes")


def checkpointing_config(enabled: bool) -> dict:
    """The GRPOConfig keyword that turns activation (gradient) checkpointing on or off under the
    installed transformers: ``{"activation_checkpointing": enabled}`` where TrainingArguments has that
    field (transformers 5.25; ``gradient_checkpointing`` is its deprecated alias there and warns),
    else ``{"gradient_checkpointing": enabled}``. TRL reads either through ``args.gradient_checkpointing``.

        GRPOConfig(output_dir="out", **checkpointing_config(True))
    """
    names = {f.name for f in dataclasses.fields(trl.GRPOConfig)}
    return {"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": enabled}


def aggregate_like_trl(trainer: GRPOTrainer, per_token: Tensor, mask: Tensor, inputs: dict, mode: str) -> Tensor:
    """Reduce a (B, T) per-token loss over ``mask`` exactly as ``GRPOTrainer._compute_loss`` reduces
    its policy loss for ``trainer.loss_type``, including the gradient-accumulation scaling."""
    loss_type = trainer.loss_type
    accum = trainer.current_gradient_accumulation_steps if mode == "train" else 1.0
    if loss_type in ("grpo", "sapo", "bnpo"):
        return reduce_tokens(per_token, mask, "grpo" if loss_type == "sapo" else loss_type) / accum
    if loss_type == "dr_grpo":
        return reduce_tokens(per_token, mask, "dr_grpo", max_completion_length=trainer.max_completion_length) / accum
    if loss_type in ("cispo", "dapo", "vespo"):
        normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / trainer.accelerator.num_processes
        if mode == "train":
            normalizer = normalizer * trainer.current_gradient_accumulation_steps / trainer.args.steps_per_generation
        return reduce_tokens(per_token, mask, "dapo", num_items=normalizer)
    if loss_type == "luspo":
        return (per_token * mask.to(per_token.dtype)).sum(-1).mean() / accum
    raise ValueError(f"Unknown loss type: {loss_type}")


class RALGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` + ``lambda_attn · L_attn`` (RAL) and optional on-policy distillation.

    Args (besides GRPOTrainer's, all keyword):
        lambda_attn: weight of the attention-policy term (paper: 0.5, 1 or 5). 0: plain GRPO.
        attn_layers: decoder layers whose attention is the policy (default: the last one).
        attn_divergence: "jsd" (paper), "kl" or "reverse_kl".
        attn_backend: ``ral.ops.attention_kl`` backend ("auto").
        teacher_model: a frozen teacher (transformers causal LM) for distillation, or None.
        distill: ``ral.integrations.distill.DistillConfig`` (mu, gamma_attn, lambda_rl, chunk_size,
            temperature); default ``DistillConfig()`` when a teacher is given. ``norm`` is ignored
            here: the distillation terms use TRL's loss aggregation.
        attach_policy: with ``lambda_attn == 0``, still record the reference and run the chosen
            layers on the fused op in the loss forward (logging ``ral/attn_div``): GRPO with RAL's
            attention path and diagnostics; the loss equals GRPOTrainer's up to the float
            difference between the op and SDPA (tests/test_trl.py checks it).
        attn_stats: log ``ral/attn_entropy`` and ``ral/attn_mass/<segment>`` (module doc).
        attn_segment_names, attn_segments: the key segments' names and a function (B, S) input ids
            -> (B, S) integer ids; default (None, None): text / image / video of a VLM config.
        attn_entropy_coef, attn_mass_coef, attn_mass_segments: the attention-statistics loss
            ``- attn_entropy_coef · entropy - attn_mass_coef · sum of mass over attn_mass_segments``
            (segment names; default image and video), reduced like TRL's loss; 0, 0: off.
    """

    def __init__(self, *args, lambda_attn: float = 1.0, attn_layers: Sequence[int] = (-1,),
                 attn_divergence: str = "jsd", attn_backend: str = "auto", teacher_model=None,
                 distill: Optional[DistillConfig] = None, attach_policy: bool = False, attn_stats: bool = False,
                 attn_segment_names: Optional[Sequence[str]] = None,
                 attn_segments: Optional[Callable[[Tensor], Tensor]] = None, attn_entropy_coef: float = 0.0,
                 attn_mass_coef: float = 0.0, attn_mass_segments: Sequence[str] = ("image", "video"), **kwargs):
        check_float("lambda_attn", lambda_attn, ">= 0")
        check_float("attn_entropy_coef", attn_entropy_coef)
        check_float("attn_mass_coef", attn_mass_coef)
        check_flag("attach_policy", attach_policy)
        check_flag("attn_stats", attn_stats)
        if attn_segments is not None and (not callable(attn_segments) or attn_segment_names is None):
            raise ValueError("attn_segments: must be a callable (input ids -> segment ids) given with "
                             "attn_segment_names")
        if distill is not None and teacher_model is None and distill.needs_teacher:
            raise ValueError("distill: mu or gamma_attn > 0 needs a teacher_model")
        if teacher_model is not None and distill is None:
            distill = DistillConfig()
        if distill is not None and distill.gamma_attn > 0 and lambda_attn > 0:
            raise ValueError("lambda_attn must be 0 when distill.gamma_attn > 0: the attention reference is the "
                             "teacher's (paper Eq. 5-6 has no RAL term)")
        super().__init__(*args, **kwargs)
        self.lambda_attn = float(lambda_attn)
        if self.lambda_attn > 0 and self.args.num_iterations == 1 \
                and self.args.steps_per_generation <= self.args.gradient_accumulation_steps:
            warnings.warn("lambda_attn > 0 with num_iterations = 1 and steps_per_generation = "
                          "gradient_accumulation_steps: each generation batch gets one optimizer step, taken at "
                          "the rollout weights, where the attention term's gradient is zero (JSD at its minimum); "
                          "use num_iterations > 1 or steps_per_generation > gradient_accumulation_steps",
                          UserWarning, stacklevel=2)
        self.distill = distill
        self._teacher_attn = distill is not None and distill.gamma_attn > 0
        self._teacher_tokens = distill is not None and distill.mu > 0
        if attach_policy and self._teacher_attn:
            raise ValueError("attach_policy: not with a teacher attention term (the reference is the teacher's)")
        self._self_reference = self.lambda_attn > 0 or attach_policy
        self.attn_entropy_coef, self.attn_mass_coef = float(attn_entropy_coef), float(attn_mass_coef)
        self._stats_loss = self.attn_entropy_coef != 0 or self.attn_mass_coef != 0
        self._stats = bool(attn_stats) or self._stats_loss
        self.attn_segments = attn_segments
        self._uses_attention = self._self_reference or self._teacher_attn or self._stats
        self.attn_policy = None
        self.teacher_policy = None
        self.teacher_model = None
        if self._uses_attention:
            self.attn_policy = AttentionPolicy(self.model, layers=attn_layers, divergence=attn_divergence,
                                               heads="mean", backend=attn_backend, stats=self._stats,
                                               segment_names=attn_segment_names)
        self._mass_segments = self._segment_ids(attn_mass_segments) if self.attn_mass_coef else ()
        if teacher_model is not None:
            teacher_model.eval()
            for p in teacher_model.parameters():
                p.requires_grad_(False)
            if self._teacher_attn:
                self.teacher_policy = AttentionPolicy(teacher_model, layers=attn_layers, divergence="jsd",
                                                      heads="mean", backend=attn_backend)
            if self.is_deepspeed_enabled:
                teacher_model = prepare_deepspeed(teacher_model, self.accelerator)
            elif self.is_fsdp_enabled:
                teacher_model = prepare_fsdp(teacher_model, self.accelerator)
            else:
                teacher_model = self.accelerator.prepare_model(teacher_model, evaluation_mode=True)
            self.teacher_model = teacher_model
        self._ral_scales = None

    def _segment_ids(self, names: Sequence[str]) -> list:
        known = self.attn_policy.segment_names
        if known is None:
            raise ValueError("attn_mass_coef: the model has no key segments (no image_token_id / video_token_id "
                             "in its config); give attn_segment_names and attn_segments")
        if isinstance(names, str) or not names or any(n not in known for n in names):
            raise ValueError(f"attn_mass_segments: must name segments of {known}, got {names!r}")
        return [known.index(n) for n in names]

    # ------------------------------------------------------------------------------------------
    # Rollout side: record the reference(s) next to the old per-token log-probs.
    # ------------------------------------------------------------------------------------------
    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        if not (self._uses_attention or self._teacher_tokens):
            return output
        prompt_ids, completion_ids = output["prompt_ids"], output["completion_ids"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
        extra = {k: output[k] for k in _MODEL_KEYS if k in output}
        n_completion = completion_ids.size(1)
        if self._self_reference:
            model = self.accelerator.unwrap_model(self.model)
            ref, _ = self._record(model, self.attn_policy, input_ids, attention_mask, extra, hidden=False)
            self._store_reference(output, ref)
        if self.teacher_model is not None:
            teacher = self.accelerator.unwrap_model(self.teacher_model)
            ref, hidden = self._record(teacher, self.teacher_policy if self._teacher_attn else None, input_ids,
                                       attention_mask, extra, hidden=self._teacher_tokens)
            if ref is not None:
                self._store_reference(output, ref)
            if hidden is not None:
                # rows predicting the completion tokens: positions S-C-1 .. S-2  -> (B, C, Dt)
                output["ral_teacher_hidden"] = hidden[:, -n_completion - 1:-1]
        return output

    @torch.no_grad()
    def _record(self, model, policy, input_ids, attention_mask, extra, hidden: bool):
        """One no-grad backbone pass; returns (AttentionReference or None, last hidden or None)."""
        chunk = input_ids.size(0) if extra else max(1, self.args.per_device_train_batch_size)
        refs, hiddens = [], []
        with disable_gradient_checkpointing(model, self.args.gradient_checkpointing_kwargs):
            for start in range(0, input_ids.size(0), chunk):
                sl = slice(start, start + chunk)
                ctx = policy.record(attention_mask=attention_mask[sl]) if policy is not None else contextlib.nullcontext()
                with ctx as rec, self.accelerator.autocast():
                    out = backbone(model)(input_ids=input_ids[sl], attention_mask=attention_mask[sl],
                                          use_cache=False, **extra)
                if policy is not None:
                    refs.append(rec.reference)
                if hidden:
                    hiddens.append(out.last_hidden_state)
        ref = AttentionReference.cat(refs) if refs else None
        return ref, (torch.cat(hiddens) if hiddens else None)

    def _store_reference(self, output: dict, ref: AttentionReference) -> None:
        self._ral_scales = ref.scales()
        output.update(ref.to_dict())

    def _load_reference(self, inputs: dict, attention_mask: Tensor) -> AttentionReference:
        ref = AttentionReference.from_dict(inputs, self._ral_scales)
        ref.key_padding_mask = attention_mask.to(torch.bool)
        return ref

    # ------------------------------------------------------------------------------------------
    # Loss side.
    # ------------------------------------------------------------------------------------------
    def _compute_loss(self, model, inputs):
        if not (self._uses_attention or self._teacher_tokens):
            return super()._compute_loss(model, inputs)
        mode = "train" if self.model.training else "eval"
        completion_mask = inputs["completion_mask"]
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        n_completion = completion_mask.size(1)
        unwrapped = self.accelerator.unwrap_model(model)

        stack = contextlib.ExitStack()
        with stack:
            cmp = None
            if self._uses_attention:
                # compare() pauses gradient checkpointing of the chosen layers for the block (a
                # recompute would run outside it) and restores it on exit.
                segments = None
                if self.attn_segments is not None:
                    segments = self.attn_segments(torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1))
                if self._self_reference or self._teacher_attn:
                    reference = self._load_reference(inputs, attention_mask)
                    block = self.attn_policy.compare(reference, row_mask=mask.bool(), attention_mask=attention_mask,
                                                     key_segments=segments)
                else:                                     # statistics alone: no reference
                    block = self.attn_policy.observe(row_mask=mask.bool(), attention_mask=attention_mask,
                                                     key_segments=segments)
                cmp = stack.enter_context(block)
            captured = {}
            if self._teacher_tokens:
                def grab(module, args, out):
                    captured["hidden"] = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
                stack.enter_context(_hook(backbone(unwrapped), grab))
            loss = super()._compute_loss(model, inputs)

        rl_weight = self.distill.lambda_rl if self.distill is not None else 1.0
        if rl_weight != 1.0:
            loss = loss * rl_weight
        logged = _StepMetrics(mask)
        stats_loss = self._log_statistics(cmp, mask, inputs, mode, logged) if self._stats else None
        if stats_loss is not None:
            loss = loss + stats_loss
        if self._self_reference or self._teacher_attn:
            div = cmp.div[:, -n_completion:]
            if self._self_reference:
                advantages = inputs["advantages"]
                advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
                attn_loss = aggregate_like_trl(self, advantages * div, mask, inputs, mode)
                loss = loss + self.lambda_attn * attn_loss
                logged.token_means(["ral/attn_div"], div)
                logged.process_mean("ral/attn_loss", attn_loss)
            else:
                loss = loss + self.distill.gamma_attn * aggregate_like_trl(self, div, mask, inputs, mode)
                logged.token_means(["ral/teacher_attn_jsd"], div)
        if self._teacher_tokens:
            h_s = captured["hidden"][:, -n_completion - 1:-1]
            rows = mask.bool()
            w_s, b_s = lm_head_params(unwrapped)
            w_t, b_t = lm_head_params(self.accelerator.unwrap_model(self.teacher_model))
            w_s, b_s = _full(w_s), _full(b_s)
            h_t = inputs["ral_teacher_hidden"]
            kl = chunked_reverse_kl(h_s[rows], w_s, h_t[rows], w_t, b_student=b_s, b_teacher=b_t,
                                    temperature=self.distill.temperature, chunk_size=self.distill.chunk_size)
            per_token = torch.zeros(rows.shape, dtype=kl.dtype, device=kl.device).masked_scatter(rows, kl)
            loss = loss + self.distill.mu * aggregate_like_trl(self, per_token, mask, inputs, mode)
            logged.token_means(["ral/token_kl"], per_token)
        logged.log(self.accelerator, self._metrics[mode])
        return loss

    def _log_statistics(self, cmp, mask: Tensor, inputs: dict, mode: str, logged: "_StepMetrics") -> Tensor:
        """Log ``ral/attn_entropy`` and ``ral/attn_mass/<segment>`` (token means over ``mask``) from the
        loss forward's ``Comparison`` into ``logged``; return the statistics loss (None when its
        coefficients are 0)."""
        n_completion = mask.shape[1]
        names, columns = cmp.statistics_columns()
        logged.token_means(names, columns[:, -n_completion:])
        if not self._stats_loss:
            return None
        mass = columns[..., 1:] if len(names) > 1 else None
        per_token = attention_stats_token_loss(columns[..., 0], mass, n_completion, entropy_coef=self.attn_entropy_coef,
                                               mass_coef=self.attn_mass_coef, segments=self._mass_segments)
        stats_loss = aggregate_like_trl(self, per_token, mask, inputs, mode)
        logged.process_mean("ral/attn_stats_loss", stats_loss)
        return stats_loss


class _StepMetrics:
    """What one loss call logs, summed over processes in a single reduction: token means over ``mask``
    (B, T) (sum over every process's tokens / their count) and per-process means of scalars (as
    ``accelerator.gather(x).mean()``)."""

    def __init__(self, mask: Tensor):
        self._mask = mask.float()
        self._token = []     # (names, (K,) masked sums)
        self._scalar = []    # (name, (1,) value)

    def token_means(self, names: List[str], x: Tensor) -> None:
        """x (B, T, K): column k logged as names[k]; or x (B, T) and one name."""
        x = x.detach().float()
        if x.dim() == 2:
            x = x[..., None]
        self._token.append((list(names), (x * self._mask[..., None]).sum((0, 1))))

    def process_mean(self, name: str, value: Tensor) -> None:
        self._scalar.append((name, value.detach().float().reshape(1)))

    def log(self, accelerator, metrics) -> None:
        """One reduce over processes, then each value appended to metrics[name]."""
        if not (self._token or self._scalar):
            return
        ones = self._mask.new_ones(1)
        parts = [s for _, s in self._token] + [v for _, v in self._scalar] + [self._mask.sum()[None], ones]
        totals = accelerator.reduce(torch.cat(parts), reduction="sum").tolist()
        tokens, processes = max(totals[-2], 1.0), totals[-1]
        at = 0
        for names, _ in self._token:
            for name in names:
                metrics[name].append(totals[at] / tokens)
                at += 1
        for name, _ in self._scalar:
            metrics[name].append(totals[at] / processes)
            at += 1


@contextlib.contextmanager
def _hook(module: torch.nn.Module, fn):
    handle = module.register_forward_hook(fn)
    try:
        yield
    finally:
        handle.remove()


def _full(t: Optional[Tensor]) -> Optional[Tensor]:
    """FSDP2 shards parameters as DTensors; the chunked KL needs the whole head (as TRL's fused head)."""
    if t is not None and type(t).__name__ == "DTensor":
        return t.full_tensor()
    return t
