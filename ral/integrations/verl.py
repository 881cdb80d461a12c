"""veRL integration: RAL's attention term in veRL 0.9.x's engine-based actor.

Supported veRL: ``verl>=0.9,<0.10`` (``pip install "ral[verl]"``). In 0.9 the actor is
``verl.workers.engine_workers.TrainingWorker`` around an engine
(``verl.workers.engine.fsdp.transformer_impl.FSDPEngineWithLMHead``): ``infer_batch`` is the
old-log-prob pass (``ActorRolloutRefWorker.compute_log_prob``), ``train_mini_batch`` splits /
shuffles a batch into mini-batches and ``engine.forward_backward_batch`` splits each into
micro-batches (fixed size or dynamic, token-balanced), calling ``engine.forward_step`` per
micro-batch: model forward -> log-probs -> the worker's loss function (``set_loss_fn``; by default
``verl.workers.utils.losses.ppo_loss``, which calls the policy loss from
``core_algos.get_policy_loss_fn(loss_mode)`` and reduces with ``core_algos.agg_loss``).

Use (worker level; what the tests run, no Ray)::

    from ral.integrations.verl import RALConfig, attach
    ral = attach(training_worker, RALConfig(lambda_attn=1.0), actor_config)
    with ral.recording():                       # the old-log-prob pass
        out = training_worker.infer_batch(batch)     # out has ral_q0 / ral_k0 / ral_stats0
    batch.update(out.select(*ral.batch_keys))   # veRL's v1 trainer does this through TransferQueue
    training_worker.train_mini_batch(batch)     # adds lambda_attn * agg(A * div) to the loss
    ral.remove()                                # undo everything

Trainer level: ``RALActorRolloutRefWorker`` (an ``ActorRolloutRefWorker`` that attaches RAL in
``init_model`` and records in ``compute_log_prob``) and the trainer mode ``ral_sync``
(``PPOTrainerSync`` with that worker), registered in veRL's trainer registry. Enable with the
entry point and these keys (see examples/verl/README.md)::

    python -m ral.integrations.verl trainer.v1.trainer_mode=ral_sync \\
        +actor_rollout_ref.ral.lambda_attn=1.0 [+actor_rollout_ref.ral.layers=[-1]] \\
        [+actor_rollout_ref.ral.divergence=jsd] [+actor_rollout_ref.ral.backend=auto] ...

What it does:

- **Record.** While ``recording()`` is active, each forward-only micro-batch of the actor runs its
  chosen layers in ``AttentionPolicy.record`` mode (rollout-time weights: this is the old-log-prob
  pass) and the micro-batch's ``model_output`` gains, per sample, jagged (nested) tensors:
  ``ral_q{i}`` (response rows, Hq x D, post-rotary), ``ral_k{i}`` (all rows, Hkv x D),
  ``ral_stats{i}`` (response rows, Hq x 2 float32). veRL concatenates them, undoes the dynamic
  batching permutation and returns them with ``log_probs``; from there they are batch fields like
  ``old_log_probs``, so veRL's mini-batch split, shuffle and dynamic batching carry them.
- **Compare.** In a training micro-batch that has ``ral_k0``, the chosen layers run in
  ``AttentionPolicy.compare`` mode in the same forward that gives veRL its log-probs (packed through
  ``ral.ops.attention_kl_varlen`` with ``use_remove_padding=True``, padded otherwise), and the loss
  function ``ral_ppo_loss`` = veRL's ``ppo_loss`` + ``lambda_attn * agg_loss(A * div,
  response_mask, loss_agg_mode, **global_batch_info)``: veRL's own aggregation (token-mean,
  seq-mean-token-sum, seq-mean-token-mean, ...) with the same global normalisation (dp size,
  global token / sequence counts) that makes micro-batch gradient accumulation exact. Rows: the
  response tokens (as in ral.integrations.trl), weighted by ``response_mask``.
- **Metrics.** ``ral/attn_div`` (mean div over response tokens) and ``ral/attn_loss`` as veRL
  ``Metric`` objects next to ``actor/pg_loss``. With ``RALConfig(stats=True)`` also
  ``ral/attn_entropy`` and ``ral/attn_mass/<segment>`` (means over the response tokens, like
  ``ral/attn_div``), from the compare call that gives div (``AttentionPolicy(stats=True)``): segments
  text / image / video from a VLM config's image / video token ids, or the caller's
  ``segment_names`` with a batch field ``ral_segments`` (nested like ``input_ids``: one integer
  segment id per token). Without segment ids only the entropy is logged.
- The one hook: ``engine.forward_step`` is wrapped on the instance (veRL has no pre/post-forward
  hook, and the chosen layers must be in record/compare mode during the model call);
  ``remove()`` deletes the wrapper. The loss goes through ``set_loss_fn`` (veRL's API for the
  worker's loss), not ``register_policy_loss``: a registered policy loss only receives log-probs,
  advantages and the mask, not the model's attention. Other layers keep the model's own attention
  implementation (e.g. flash_attention_2): the model is switched to ``"ral+<original>"``, which is
  the original everywhere except the chosen layers while recording or comparing (sdpa / eager
  models go to ``"ral"``, SDPA outside the chosen layers). The delegation to flash_attention_2 is
  not tested here (no GPU / flash-attn on the test machine).
- RAL needs veRL to recompute the old log-probs (the default); with
  ``algorithm.rollout_correction.bypass_mode`` there is no old-log-prob pass, no reference and no
  term (micro-batches without ``ral_k0`` get veRL's plain loss).
- ``lambda_attn == 0`` attaches nothing to the model (no record, no compare) and the loss function
  is veRL's ``ppo_loss``: the update equals veRL's bit for bit (tested).

The attention term has zero gradient while the weights still equal the rollout weights (JSD is
flat at its minimum): it acts from the second optimizer step on a batch, so use
``ppo_mini_batch_size < train_batch_size`` or ``ppo_epochs > 1`` (the trainer-level worker warns
once when an update takes one step: ``RALActor.check_updates``).

Reference size (bytes per token; the reference lives in the batch from the old-log-prob pass to the
end of the update, on the host / in TransferQueue between stages). Per chosen layer:
q = Hq * D * 2 bytes per response token (bf16), k = Hkv * D * 2 per token (prompt and response),
stats = Hq * 2 * 4 per response token. Qwen2.5-VL-7B (Hq = 28, Hkv = 4, D = 128, bf16):
q 7,168 B + stats 224 B per response token, k 1,024 B per token: 8,416 B per response token and
1,024 B per prompt / image token. E.g. 512 samples x (1,024 prompt + 1,024 response tokens):
512 * (1,024 * 1,024 + 1,024 * 8,416) B = 4.95 GB (4.6 GiB) per step for the whole batch.

Ulysses sequence parallelism (``ulysses_sequence_parallel_size`` = P > 1, ``use_remove_padding``):
veRL pads each micro-batch's packed stream to a multiple of P and gives sp rank r the r-th contiguous
slice; every other layer all-to-alls to (whole stream, H / P heads) and back inside transformers'
flash-attention forward (veRL's ``_ulysses_flash_attention_forward``). The chosen layer keeps its
slice with all heads and runs ``ral.distributed.attention_kl_cp_varlen`` (layout "contiguous", veRL's
split) over veRL's sp group, which all-gathers the keys: the head-mean policy needs every head of a
row. Recorded slices are all-gathered, so the batch holds the whole stream's reference as with P = 1;
in the update each rank cuts its slice from it, and the per-token div is gathered like veRL's
log-probs (``gather_outputs_and_unpad``, the same gradient scaling). Tested: P = 2 on 2 gloo ranks
equals P = 1 (losses, attention terms, parameters; with and without dynamic batch size; tests/verl,
on CPU through a test-only SDPA stand-in for flash-attn). The model must be on a flash-attention implementation (on sdpa / eager
veRL's all-to-all never runs: veRL itself would attend within each rank's slice; refused).
``RALConfig(stats=True)`` works there too: each rank passes its slice of the ``ral_segments`` ids,
gathered with the keys, and the entropy / masses are gathered like div (tested: P = 2 logs what P = 1
logs). Qwen2-VL / Qwen2.5-VL under Ulysses are refused: veRL's all-to-all for them lives in the
attention forward RAL replaces (``qwen2_vl_attn_forward``, which also needs flash-attn).

Limits: ``pad_to_length`` must be off,
``use_fused_kernels`` is fine (the term does not need logits). Only FSDP/FSDP2 engines (language
models and VLMs whose decoder layers transformers builds with ``layer_idx``).

VLMs (tested: a tiny Qwen2.5-VL, images in the prompts): the images travel as veRL carries them
(``multi_modal_inputs``, Qwen2.5-VL's (4, L) position ids whose text row shows the packing); the
chosen layer is found by module (``model.language_model.layers[...]``), never the vision tower.
veRL's ``apply_monkey_patch`` replaces Qwen2-VL / Qwen2.5-VL's decoder attention forward (for
remove padding) with one that calls flash-attn directly, past transformers' attention interface, so
the chosen layer would never reach RAL; while attached, RAL gives the actor's decoder attention
modules transformers' own forward back (through the model's attention implementation, e.g.
``ral+flash_attention_2``; per instance, undone by ``remove()``). Import this module before veRL
builds the model (the trainer-level worker does).
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from dataclasses import dataclass
from functools import partial
from types import MethodType
from typing import Optional, Sequence

import torch
from torch import Tensor

try:
    from verl.trainer.ppo.core_algos import agg_loss
    from verl.utils import tensordict_utils as tu
    from verl.utils.metric import AggregationType, Metric
    from verl.workers.utils.losses import ppo_loss
except ImportError as exc:  # pragma: no cover - exercised only without verl
    raise ImportError("ral.integrations.verl needs veRL: pip install 'ral[verl]' (verl>=0.9,<0.10)") from exc

from ..backends import BACKENDS
from ..checks import check_choice, check_flag, check_float
from ..reference import DIVERGENCES
from .transformers import AttentionPolicy, AttentionReference, LayerReference, Packing
from .transformers import register as register_attention

__all__ = ["RALConfig", "RALActor", "attach", "ral_ppo_loss", "reference_bytes_per_token", "SUPPORTED_VERL"]

SUPPORTED_VERL = ">=0.9,<0.10"


@dataclass
class RALConfig:
    """``lambda_attn``: weight of the attention term (0: plain veRL). ``layers``: decoder layers whose
    head-mean attention is the policy (default the last). ``divergence``: "jsd" (paper), "kl",
    "reverse_kl". ``backend``: ``ral.ops.attention_kl`` backend. ``stats``: also log the attention
    entropy and per-segment mass (with ``lambda_attn > 0``); ``segment_names``: names of the ids in
    a ``ral_segments`` batch field (default: text / image / video of a VLM config)."""

    lambda_attn: float = 1.0
    layers: Sequence[int] = (-1,)
    divergence: str = "jsd"
    backend: str = "auto"
    stats: bool = False
    segment_names: Optional[Sequence[str]] = None

    def __post_init__(self):
        check_float("lambda_attn", self.lambda_attn, ">= 0")
        check_flag("stats", self.stats)
        check_choice("divergence", self.divergence, DIVERGENCES)
        check_choice("backend", self.backend, BACKENDS)

    @classmethod
    def from_dict(cls, d) -> "RALConfig":
        """From veRL's ``actor_rollout_ref.ral`` mapping. A key that is not a field is a ValueError
        naming it (a misspelt key would otherwise train with the default), and values are checked as
        given (``stats: "false"`` is not turned into True)."""
        d = dict(d or {})
        fields = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise ValueError(f"actor_rollout_ref.ral: unknown key(s) {unknown}; the keys are {fields}")
        for name in ("layers", "segment_names"):
            if isinstance(d.get(name), (list, tuple)):
                d[name] = tuple(d[name])
        return cls(**d)


def reference_bytes_per_token(q_heads: int, kv_heads: int, head_dim: int, dtype_bytes: int = 2, layers: int = 1):
    """(bytes per response token, bytes per prompt token) of the recorded reference."""
    return layers * (q_heads * head_dim * dtype_bytes + q_heads * 2 * 4 + kv_heads * head_dim * dtype_bytes), \
        layers * kv_heads * head_dim * dtype_bytes


# ----------------------------------------------------------------------------------------------
# Layout helpers: veRL micro-batches hold nested (jagged) input ids, one sequence per sample,
# prompt then response, no padding.
# ----------------------------------------------------------------------------------------------

def _seq_offsets(micro_batch) -> Tensor:
    return micro_batch["input_ids"].offsets().to(torch.long)


def _response_lengths(micro_batch) -> Tensor:
    responses = micro_batch.get("responses", None)
    if isinstance(responses, Tensor) and responses.is_nested:
        return responses.offsets().diff().to(torch.long)
    mask, prompts = micro_batch.get("attention_mask", None), micro_batch.get("prompts", None)
    if isinstance(mask, Tensor) and not mask.is_nested and isinstance(prompts, Tensor) and not prompts.is_nested:
        return mask[:, prompts.shape[1]:].sum(1).to(torch.long)
    rm = micro_batch["response_mask"]
    if rm.is_nested:
        return rm.offsets().diff().to(torch.long)
    raise ValueError("ral: cannot tell the response lengths: the batch needs nested 'responses', or "
                     "'prompts' with a padded 'attention_mask', or a nested 'response_mask'")


def _response_rows(micro_batch):
    """Flat row indices (into the packed tokens) of every sample's response, and the lengths."""
    cu = _seq_offsets(micro_batch)
    lengths = _response_lengths(micro_batch).to(cu.device)
    first = (cu[1:].to(torch.long) - lengths).repeat_interleave(lengths)       # each row's response start
    before = (lengths.cumsum(0) - lengths).repeat_interleave(lengths)          # rows of earlier responses
    rows = first + torch.arange(first.shape[0], device=cu.device) - before
    return rows, lengths


def _response_mask_flat(micro_batch, lengths: Tensor) -> Tensor:
    rm = micro_batch["response_mask"]
    if rm.is_nested:
        return rm.values().to(torch.bool)
    return rm[_within(lengths.to(rm.device), rm.shape[1])].to(torch.bool)


def _padded_rows(flat: Tensor, lengths: Tensor, width: int) -> Tensor:
    """(sum(lengths), ...) -> (B, width, ...) right-padded with zeros."""
    out = flat.new_zeros((len(lengths), width) + tuple(flat.shape[1:]))
    out[_within(lengths.to(flat.device), width)] = flat
    return out


def _within(lengths: Tensor, width: int) -> Tensor:
    """(B, width) bool: position j of sample i is below lengths[i] (row-major = the packed order)."""
    return torch.arange(width, device=lengths.device)[None] < lengths[:, None]


def _flatten_padded(t: Tensor, cu: Tensor) -> Tensor:
    """(B, heads, S, dim) right-padded -> (T, heads, dim) packed in sample order."""
    return t.transpose(1, 2)[_within(cu.diff().to(t.device), t.shape[2])]


def _nested(values: Tensor, lengths: Tensor) -> Tensor:
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.long, device=values.device)
    offsets[1:] = lengths.to(values.device).cumsum(0)
    return torch.nested.nested_tensor_from_jagged(values, offsets=offsets)


# ----------------------------------------------------------------------------------------------
# The attention implementation: the model's own one, except the chosen layers while active
# (ral.integrations.transformers.register: "ral+<original>").
# ----------------------------------------------------------------------------------------------

# veRL's apply_monkey_patch replaces these classes' forward (class-wide, for use_remove_padding or Ulysses)
# with its own (verl.models.transformers.qwen2_vl.qwen2_vl_attn_forward), which calls flash-attn
# directly, past transformers' attention interface: the chosen layers would never reach RAL ("record:
# the chosen layers did not run"), and without flash-attn (CPU) it cannot run at all. transformers'
# own forward, kept here from before veRL patches it, routes through the model's attention
# implementation and passes the text position ids that show the packing. Under sequence parallelism,
# the other reason for veRL's patch, the patched forward also holds veRL's all-to-all: such models
# are refused there.
_VERL_PATCHED_ATTENTION = (("transformers.models.qwen2_vl.modeling_qwen2_vl", "Qwen2VLAttention"),
                           ("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl", "Qwen2_5_VLAttention"))
_TRANSFORMERS_FORWARD = {}


def _keep_transformers_forwards():
    import importlib
    for module_name, class_name in _VERL_PATCHED_ATTENTION:
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError):  # pragma: no cover - other transformers versions
            continue
        if cls.forward.__module__ == module_name:
            _TRANSFORMERS_FORWARD.setdefault(cls, cls.forward)
        else:
            _TRANSFORMERS_FORWARD.setdefault(cls, None)


_keep_transformers_forwards()


def _verl_patched_attention(model) -> list:
    """(module, transformers' forward) of every decoder attention module whose class veRL patched."""
    found = []
    for module in model.modules():
        cls = next((c for c in type(module).__mro__ if c in _TRANSFORMERS_FORWARD), None)
        if cls is None or cls.forward is _TRANSFORMERS_FORWARD[cls]:
            continue
        if _TRANSFORMERS_FORWARD[cls] is None:
            raise RuntimeError(f"ral: veRL patched {cls.__name__}.forward before ral.integrations.verl was imported; "
                               "import it before building the worker")
        found.append((module, _TRANSFORMERS_FORWARD[cls]))
    return found


def _restore_attention_forwards(model) -> list:
    """Give the decoder attention modules veRL patched transformers' forward back (per instance)."""
    restored = []
    for module, forward in _verl_patched_attention(model):
        module.forward = MethodType(forward, module)
        restored.append(module)
    return restored


def _hf_model(module):
    """The transformers model under veRL's FSDP wrapper (FSDP1 wraps it, FSDP2 is the model)."""
    inner = getattr(module, "_fsdp_wrapped_module", None) or module
    while not hasattr(inner, "config") and hasattr(inner, "module"):
        inner = inner.module
    return inner


# ----------------------------------------------------------------------------------------------
# The actor hook
# ----------------------------------------------------------------------------------------------

class RALActor:
    """RAL attached to one veRL ``TrainingWorker`` (the actor); made by ``attach``."""

    def __init__(self, worker, config: RALConfig, actor_config=None):
        self.worker, self.config = worker, config
        self.engine = worker.engine
        self.active = config.lambda_attn > 0
        self.policy: Optional[AttentionPolicy] = None
        self._cmp = None
        self._recording = False
        self._old_loss_fn = worker.loss_fn
        self._sp_group = None
        self._warned_one_update = False
        if not self.active:
            return
        ulysses = bool(getattr(self.engine, "use_ulysses_sp", False))
        if getattr(self.engine, "pad_to_length", False):
            raise ValueError("ral: engine pad_to_length is not supported (it appends a padding sequence)")
        model = _hf_model(self.engine.module)
        original = model.config._attn_implementation
        implementation = register_attention(original)
        if ulysses and implementation == "ral":
            raise ValueError(
                f"ral: ulysses_sequence_parallel_size > 1 needs the model on a flash-attention implementation, "
                f"got {original!r}: veRL's Ulysses all-to-all runs only inside transformers' flash-attention "
                f"forward (verl.models.transformers.monkey_patch._ulysses_flash_attention_forward); on "
                f"{original!r} every rank attends to its own sequence shard only, in veRL itself")
        if ulysses and _verl_patched_attention(model):
            raise ValueError(
                "ral: ulysses_sequence_parallel_size > 1 with a Qwen2-VL / Qwen2.5-VL model is not supported: veRL's "
                "Ulysses all-to-all for these models lives in its own attention forward "
                "(verl.models.transformers.qwen2_vl.qwen2_vl_attn_forward), which RAL replaces with transformers' "
                "forward to reach the chosen layer, so the other layers would attend within each rank's slice")
        self.policy = AttentionPolicy(model, layers=tuple(config.layers), divergence=config.divergence,
                                      heads="mean", backend=config.backend, stats=config.stats,
                                      segment_names=config.segment_names)
        self._original_implementation = original
        self._restored = _restore_attention_forwards(model)
        if ulysses:
            self._sp_group = self.engine.ulysses_parallel_group
            self.policy._layer_override = self._attend_ulysses
        self.engine.forward_step = self._forward_step          # the one hook (instance attribute)
        if actor_config is not None:
            worker.set_loss_fn(partial(ral_ppo_loss, config=actor_config, ral=self))

    @property
    def batch_keys(self):
        n = len(self.policy.modules) if self.policy is not None else 0
        return [f"ral_{kind}{i}" for i in range(n) for kind in ("q", "k", "stats")]

    def remove(self) -> None:
        """Undo ``attach``: the engine's own forward_step, the previous loss function, the model's
        original attention implementation."""
        if self.policy is None:
            return
        self.engine.__dict__.pop("forward_step", None)
        self.worker.set_loss_fn(self._old_loss_fn)
        self.policy.remove()
        self.policy.model.set_attn_implementation(self._original_implementation)
        for module in self._restored:
            module.__dict__.pop("forward", None)
        self.policy = None

    def check_updates(self, data) -> int:
        """The optimizer steps ``train_mini_batch(data)`` will take on this rank: batch rows over the
        per-rank mini-batch (veRL's ``mini_batch_size`` / ``num_mini_batch`` fields of ``data``), times
        ``epochs``. With one step the attention term cannot act (its gradient is zero at the rollout
        weights, where that step is taken): a UserWarning, once per actor. The trainer-level worker
        calls this in ``update_actor``; a worker-level loop may call it before ``train_mini_batch``."""
        mini = tu.get_non_tensor_data(data=data, key="mini_batch_size", default=None)
        count = tu.get_non_tensor_data(data=data, key="num_mini_batch", default=None)
        epochs = int(tu.get_non_tensor_data(data=data, key="epochs", default=1))
        if mini is not None:
            per_rank = max(1, int(mini) // self.engine.get_data_parallel_size())
            steps = data.shape[0] // per_rank * epochs
        else:
            steps = int(count or 1) * epochs
        if self.active and steps <= 1 and not self._warned_one_update:
            self._warned_one_update = True
            warnings.warn("ral: lambda_attn > 0 with one optimizer step per rollout (ppo_mini_batch_size = the "
                          "train batch and ppo_epochs = 1): that step is taken at the rollout weights, where the "
                          "attention term's gradient is zero; use ppo_mini_batch_size < train_batch_size or "
                          "ppo_epochs > 1", UserWarning, stacklevel=2)
        return steps

    @contextlib.contextmanager
    def recording(self):
        """Record the reference in the forward-only passes of this block (the old-log-prob pass)."""
        self._recording = True
        try:
            yield self
        finally:
            self._recording = False

    # -- the wrapper ---------------------------------------------------------------------------
    def _forward_step(self, micro_batch, loss_function, forward_only):
        original = type(self.engine).forward_step.__get__(self.engine)
        if self.policy is None:
            return original(micro_batch, loss_function, forward_only)
        if self._sp_group is not None:
            self._sp_stream(micro_batch)
        if forward_only and self._recording:
            with self.policy.record() as rec:
                loss, output = original(micro_batch, loss_function, forward_only)
            output.setdefault("model_output", {}).update(self._to_batch(rec.reference, micro_batch))
            return loss, output
        if not forward_only and "ral_k0" in micro_batch.keys():
            reference, rows = self._from_batch(micro_batch)
            with self.policy.compare(reference, row_mask=rows, key_segments=self._segments(micro_batch, reference)) as cmp:
                self._cmp = (cmp, micro_batch)
                try:
                    return original(micro_batch, loss_function, forward_only)
                finally:
                    self._cmp = None
        return original(micro_batch, loss_function, forward_only)

    def _to_batch(self, reference: AttentionReference, micro_batch) -> dict:
        if self._sp_group is not None:
            reference = self._sp_gathered(reference)
        cu = _seq_offsets(micro_batch)
        rows, lengths = _response_rows(micro_batch)
        out = {}
        for i, layer in enumerate(reference.layers):
            if reference.packing is not None:
                if not torch.equal(reference.packing.cu_seqlens_q.cpu().long(), cu.cpu()):
                    raise ValueError("ral: the recorded packing does not match the micro-batch's sequences")
                q, k, stats = layer.q, layer.k, layer.stats
            else:
                q, k, stats = (_flatten_padded(t, cu) for t in (layer.q, layer.k, layer.stats))
            rows_d = rows.to(q.device)
            out[f"ral_q{i}"] = _nested(q[rows_d].contiguous(), lengths)
            out[f"ral_stats{i}"] = _nested(stats[rows_d].contiguous(), lengths)
            out[f"ral_k{i}"] = _nested(k.contiguous(), cu.diff())
        return out

    # -- Ulysses sequence parallelism ----------------------------------------------------------
    # veRL pads the micro-batch's packed stream of T tokens to T_pad, a multiple of the sp size (the
    # padding is one more sequence at the end, positions 0, 1, ...) and gives sp rank r the contiguous
    # slice r * T_pad / sp ... (ulysses_pad_and_slice_inputs); the other layers' attention all-to-alls
    # that to (the whole stream, 1/sp of the heads) and back. The chosen layer keeps its slice with all
    # heads and runs ral.distributed.attention_kl_cp_varlen (layout "contiguous": the same split) over
    # veRL's sp group, which all-gathers the keys. The reference in the batch is the whole stream's,
    # as with sp = 1: recorded slices are all-gathered, compared ones are sliced out of it.

    def _sp_stream(self, micro_batch):
        from verl.utils.device import get_device_id
        cu = _seq_offsets(micro_batch)
        world = torch.distributed.get_world_size(self._sp_group)
        total = int(cu[-1])
        self._sp_total = total                                     # the stream's tokens, unpadded
        self._sp_pad = (world - total % world) % world            # veRL's ulysses_pad
        cu_pad = torch.cat([cu, cu.new_tensor([total + self._sp_pad])]) if self._sp_pad else cu
        self._sp_cu = cu_pad.to(device=get_device_id(), dtype=torch.int32)
        self._sp_longest = int(cu_pad.diff().max())
        self._sp_packing = Packing(cu.to(torch.int32), cu.to(torch.int32), int(cu.diff().max()), int(cu.diff().max()))

    def _sp_whole(self, t: Tensor) -> Tensor:
        """A whole-stream (T, ...) tensor padded like veRL's inputs: (T_pad, ...)."""
        if self._sp_pad:
            t = torch.cat([t, t.new_zeros((self._sp_pad,) + tuple(t.shape[1:]))])
        return t

    def _sp_local(self, t: Tensor) -> Tensor:
        """This sp rank's contiguous slice of a whole-stream (T, ...) tensor padded like veRL's inputs."""
        from ral.distributed import shard
        return shard(self._sp_whole(t), 0, self._sp_group, "contiguous")

    def _sp_gathered(self, reference: AttentionReference) -> AttentionReference:
        """The recorded slices all-gathered over the sp group into the whole stream (padding dropped)."""
        from ral.distributed import unshard
        total = self._sp_total + self._sp_pad

        def whole(t):
            return unshard(t.contiguous(), 0, total, self._sp_group, "contiguous")[:total - self._sp_pad]

        layers = [LayerReference(whole(layer.q), whole(layer.k), whole(layer.stats), layer.scale)
                  for layer in reference.layers]
        return AttentionReference(layers, None, self._sp_packing)

    def _attend_ulysses(self, slot: int, module, query: Tensor, key: Tensor, value: Tensor, scaling, kwargs: dict):
        """The chosen layer under Ulysses: query (1, H, T_r, D), key / value (1, Hkv, T_r, D), this
        rank's slice with all heads, and the attention call's other keyword arguments -> ((1, T_r, H, Dv), None)."""
        from ral.distributed import GatheredKeys, attention_kl_cp_varlen
        from verl.utils.ulysses import gather_outputs_and_unpad
        policy = self.policy
        scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
        if query.dtype != value.dtype or key.dtype != value.dtype:
            query, key = query.to(value.dtype), key.to(value.dtype)
        policy._check_layer(slot, kwargs, self._sp_longest, self._sp_total + self._sp_pad)
        if query.shape[0] != 1:
            raise ValueError(f"ral: under Ulysses the chosen layer expects veRL's packed (1, T/sp) call, got batch "
                             f"{query.shape[0]}")
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))          # (T_r, heads, dim)
        opts = dict(cu_seqlens=self._sp_cu, max_seqlen=self._sp_longest, group=self._sp_group, layout="contiguous",
                    divergence=policy.divergence, heads=policy.heads, exclude_self=policy.exclude_self, causal=True,
                    backend=policy.backend, scale=scale)
        if policy._mode == "record":
            q_ref, k_ref = q.detach(), k.detach()
            res = attention_kl_cp_varlen(q_ref, k_ref, v.detach(), q_ref=q_ref, k_ref=k_ref, ref_scale=scale, **opts)
            policy._recorded(slot, LayerReference(q_ref, k_ref, res.stats, scale), None, self._sp_packing)
            return res.out[None], None
        if policy._mode != "compare":
            raise ValueError(f"ral: mode {policy._mode!r} is not supported under Ulysses sequence parallelism")
        reference, row_mask, cmp, _ = policy._state
        ref = reference.layers[slot]
        rows = None if row_mask is None else self._sp_local(row_mask.reshape(-1))
        # the statistics' segment ids are the whole stream's (1, T): this rank passes its slice of them,
        # attention_kl_cp_varlen gathers them with the keys
        statistics, has_mass = policy._statistics(key, (1, self._sp_total))
        if statistics:
            statistics["key_segments"] = self._sp_local(statistics["key_segments"].reshape(-1))
        # the batch holds the whole stream's reference: its keys go in whole, with no all-gather
        res = attention_kl_cp_varlen(q, k, v, q_ref=self._sp_local(ref.q), k_ref=GatheredKeys(self._sp_whole(ref.k)),
                                     ref_stats=self._sp_local(ref.stats), ref_scale=ref.scale, row_mask=rows,
                                     **statistics, **opts)

        def whole(t):  # the whole stream's rows on every sp rank, as veRL gathers its log-probs
            return gather_outputs_and_unpad(t, gather_dim=0, unpad_dim=0, padding_size=self._sp_pad,
                                            group=self._sp_group)[None]
        cmp._add(policy.layers[slot], whole(res.div), whole(res.entropy) if statistics else None,
                 whole(res.mass) if has_mass else None)
        return res.out[None], None

    def _from_batch(self, micro_batch):
        from verl.utils.device import get_device_id
        device = torch.device(get_device_id()) if not isinstance(get_device_id(), torch.device) else get_device_id()
        cu = _seq_offsets(micro_batch)
        rows, lengths = _response_rows(micro_batch)
        total = int(cu[-1])
        row_flat = torch.zeros(total, dtype=torch.bool)
        row_flat[rows] = _response_mask_flat(micro_batch, lengths).cpu()
        packed = tu.get_non_tensor_data(data=micro_batch, key="use_remove_padding", default=True)
        layers = []
        for i, module in enumerate(self.policy.modules):
            q_resp = micro_batch[f"ral_q{i}"].values().to(device)
            stats_resp = micro_batch[f"ral_stats{i}"].values().to(device)
            k = micro_batch[f"ral_k{i}"].values().to(device)
            q = q_resp.new_zeros((total,) + tuple(q_resp.shape[1:]))
            stats = stats_resp.new_zeros((total,) + tuple(stats_resp.shape[1:]))
            q[rows.to(device)], stats[rows.to(device)] = q_resp, stats_resp
            scale = float(module.scaling)
            if packed:
                layers.append(LayerReference(q, k, stats, scale))
            else:
                layers.append(LayerReference(*(self._pad(t, cu) for t in (q, k, stats)), scale))
        if packed:
            cu32 = cu.to(device=device, dtype=torch.int32)
            longest = int(cu.diff().max())
            return AttentionReference(layers, None, Packing(cu32, cu32, longest, longest)), row_flat[None].to(device)
        width = int(cu.diff().max())
        kpm = torch.arange(width)[None] < cu.diff()[:, None]
        return AttentionReference(layers, kpm.to(device)), _padded_rows(row_flat, cu.diff(), width).to(device)

    def _segments(self, micro_batch, reference: AttentionReference) -> Optional[Tensor]:
        """The caller's ``ral_segments`` (nested, one id per token) in the call's layout: (1, T)
        packed, (B, S) right-padded; None without that field (or without statistics)."""
        if not self.config.stats or "ral_segments" not in micro_batch.keys():
            return None
        flat = micro_batch["ral_segments"].values()
        device = reference.layers[0].k.device
        if reference.packing is not None:
            return flat[None].to(device)
        cu = _seq_offsets(micro_batch)
        return _padded_rows(flat, cu.diff(), int(cu.diff().max())).to(device)

    @staticmethod
    def _pad(t: Tensor, cu: Tensor) -> Tensor:
        """(T, heads, dim) packed -> (B, heads, S, dim) right-padded (veRL's no-rmpad layout)."""
        return _padded_rows(t, cu.diff(), int(cu.diff().max())).transpose(1, 2).contiguous()

    # -- the loss side ---------------------------------------------------------------------
    def response_div(self, micro_batch, width: int) -> Tensor:
        """The compared div at the response rows, (B, width) right-padded like veRL's response tensors."""
        return self.response_values(self._cmp[0].div, micro_batch, width)

    @staticmethod
    def response_values(values: Tensor, micro_batch, width: int) -> Tensor:
        """Per-token values of the compare call, (B, S, ...) padded or (1, T, ...) packed, at the
        response rows: (B, width, ...) right-padded like veRL's response tensors."""
        cu = _seq_offsets(micro_batch)
        flat = values.flatten(0, 1) if values.shape[0] == 1 and values.shape[1] == int(cu[-1]) else \
            values[_within(cu.diff().to(values.device), values.shape[1])]
        rows, lengths = _response_rows(micro_batch)
        return _padded_rows(flat[rows.to(flat.device)], lengths, width)


def attach(worker, config: Optional[RALConfig] = None, actor_config=None) -> RALActor:
    """Attach RAL to a veRL ``TrainingWorker``. ``actor_config`` (veRL ``ActorConfig``): the loss
    function becomes ``ral_ppo_loss`` with it; None keeps the worker's loss function (then call
    ``worker.set_loss_fn(partial(ral_ppo_loss, config=..., ral=handle))`` yourself)."""
    return RALActor(worker, config or RALConfig(), actor_config)


def ral_ppo_loss(config, model_output, data, dp_group=None, *, ral: RALActor, base=ppo_loss):
    """veRL's ``ppo_loss`` + ``lambda_attn * agg_loss(A * div)`` with its loss_agg_mode and global
    batch normalisation; metrics ``ral/attn_div`` and ``ral/attn_loss`` (with ``RALConfig.stats``
    also ``ral/attn_entropy`` and ``ral/attn_mass/<segment>``, response-token means)."""
    loss, metrics = base(config, model_output, data, dp_group)
    if ral._cmp is None:
        return loss, metrics
    padded = data.select("response_mask", "advantages").to_padded_tensor()
    mask = padded["response_mask"].to(torch.bool)
    advantages = padded["advantages"]
    div = ral.response_div(data, mask.shape[1]).to(advantages.device)
    attn_loss = agg_loss(loss_mat=advantages * div, loss_mask=mask, loss_agg_mode=config.loss_agg_mode,
                         **config.global_batch_info)
    loss = loss + ral.config.lambda_attn * attn_loss
    aggregation = metrics["actor/pg_loss"].aggregation if "actor/pg_loss" in metrics else AggregationType.MEAN
    metrics["ral/attn_loss"] = Metric(value=attn_loss.detach(), aggregation=aggregation)
    div_mean = (div.detach() * mask).sum() / mask.sum().clamp(min=1)
    metrics["ral/attn_div"] = Metric(value=div_mean, aggregation=AggregationType.MEAN)
    names, columns = ral._cmp[0].statistics_columns()
    if columns is not None:
        values = ral.response_values(columns.detach(), data, mask.shape[1]).to(advantages.device)
        means = (values * mask[..., None]).sum((0, 1)) / mask.sum().clamp(min=1)
        for i, name in enumerate(names):
            metrics[name] = Metric(value=means[i], aggregation=AggregationType.MEAN)
    return loss, metrics


# ----------------------------------------------------------------------------------------------
# Trainer level (Ray + TransferQueue + a rollout engine: not runnable on a CPU machine; see
# examples/verl/README.md). Built on first use so that the worker-level API above imports without
# veRL's rollout / TransferQueue dependencies.
# ----------------------------------------------------------------------------------------------

def worker_class():
    """``RALActorRolloutRefWorker``: veRL's ``ActorRolloutRefWorker`` + RAL from ``actor_rollout_ref.ral``."""
    from verl.single_controller.base.decorator import Dispatch, make_nd_compute_dataproto_dispatch_fn, register
    from verl.workers.engine_workers import ActorRolloutRefWorker

    class RALActorRolloutRefWorker(ActorRolloutRefWorker):
        ral: Optional[RALActor] = None

        @register(dispatch_mode=Dispatch.ONE_TO_ALL)
        def init_model(self):
            super().init_model()
            if self.actor is None:
                return
            from omegaconf import OmegaConf
            raw = self.config.get("ral", None)
            cfg = RALConfig.from_dict(OmegaConf.to_container(raw, resolve=True) if raw is not None else {})
            self.ral = attach(self.actor, cfg)
            if self.ral.active:
                # keep veRL's loss function (ppo_loss or distillation_ppo_loss) as the base
                fn = self.loss_fn
                base = partial(fn.func, **{k: v for k, v in fn.keywords.items() if k != "config"})
                self.actor.set_loss_fn(partial(ral_ppo_loss, config=fn.keywords["config"], ral=self.ral, base=base))

        @register(dispatch_mode=make_nd_compute_dataproto_dispatch_fn(mesh_name="actor"))
        def update_actor(self, data):
            if self.ral is not None:
                self.ral.check_updates(data)
            return super().update_actor(data)

        @register(dispatch_mode=make_nd_compute_dataproto_dispatch_fn(mesh_name="actor"))
        def compute_log_prob(self, data):
            # the reference pass of a LoRA actor (ref_in_actor) sets no_lora_adapter: not the old policy
            record = self.ral is not None and self.ral.active and \
                not tu.get_non_tensor_data(data=data, key="no_lora_adapter", default=False)
            with self.ral.recording() if record else contextlib.nullcontext():
                return super().compute_log_prob(data)

    return RALActorRolloutRefWorker


def register_trainer_mode(name: str = "ral_sync"):
    """Register ``PPOTrainerSync`` with ``RALActorRolloutRefWorker`` as veRL trainer mode ``name``."""
    import ray
    from verl.trainer.ppo.v1.trainer_base import TRAINER_REGISTRY, register_trainer
    from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
    from verl.workers.engine_workers import ActorRolloutRefWorker

    if name in TRAINER_REGISTRY:
        return TRAINER_REGISTRY[name]
    worker = worker_class()

    class RALPPOTrainerSync(PPOTrainerSync):
        def _init_resource_pool_mgr(self):
            super()._init_resource_pool_mgr()
            for role, cls in list(self.role_worker_mapping.items()):
                if getattr(cls, "__ray_actor_class__", None) is ActorRolloutRefWorker:
                    self.role_worker_mapping[role] = ray.remote(worker)

    return register_trainer(name)(RALPPOTrainerSync)


def main():  # pragma: no cover - needs GPUs, Ray, TransferQueue and a rollout engine
    """``python -m ral.integrations.verl <veRL hydra overrides>``: veRL's ``main_ppo`` with trainer
    mode ``ral_sync`` registered in the task runner's process."""
    import sys

    import ray
    from verl.trainer import main_ppo

    runner_base = main_ppo.TaskRunnerV1.__ray_actor_class__

    @ray.remote
    class RALTaskRunner(runner_base):
        def run(self, config):
            register_trainer_mode()
            return super().run(config)

    main_ppo.TaskRunnerV1 = RALTaskRunner       # main_ppo.main passes this class to run_ppo
    if not any(a.startswith("trainer.v1.trainer_mode=") for a in sys.argv[1:]):
        sys.argv.append("trainer.v1.trainer_mode=ral_sync")
    main_ppo.main()


if __name__ == "__main__":  # pragma: no cover
    main()
