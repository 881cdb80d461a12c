"""transformers integration: an attention implementation named ``"ral"`` and ``AttentionPolicy``.

``AttentionPolicy(model)`` registers ``"ral"`` in transformers' ``AttentionInterface`` (and the
same 4-D boolean mask as SDPA in ``AttentionMaskInterface``), switches the model to it, and marks
the chosen decoder layers (default: the last one, as in the paper). Every other layer, every
vision-tower / encoder attention, and the chosen layers outside a ``record`` / ``compare`` block
(generation, evaluation) run SDPA unchanged.

Two modes::

    policy = AttentionPolicy(model, layers=(-1,), divergence="jsd", heads="mean")

    # 1. record: the old policy (or a teacher), no grad. Caches post-rotary q, k and the row
    #    statistics of the chosen layers: O(B*S*D) per layer, never an S x S map.
    with torch.no_grad(), policy.record() as ref:
        old_logits = model(input_ids, attention_mask=attention_mask).logits
    reference = ref.reference                     # AttentionReference, sliceable by batch rows

    # 2. compare: training. The chosen layers compute their output *and* the divergence of their
    #    attention policy from the reference in one ``ral.ops.attention_kl`` call.
    with policy.compare(reference[idx], row_mask=response_mask[idx]) as cmp:
        logits = model(input_ids[idx], attention_mask=attention_mask[idx]).logits
    div = cmp.div                                 # (B, S) float32, differentiable; 0 off row_mask

Masks. Padding (left or right) comes from the model's 2-D ``attention_mask``, captured from the
model call (or passed explicitly to ``record`` / ``compare``) and handed to the op as
``key_padding_mask``. ``row_mask`` marks the rows (tokens) whose divergence counts, usually the
response tokens: (B, S) over the whole sequence, or (B, C) over its last C positions (TRL's
``completion_mask`` when ``input_ids = cat(prompt_ids, completion_ids)``).

Limits. Record / compare calls must be full-sequence passes without a KV cache (no incremental
decoding) with a 2-D padding mask: custom 4-D masks (packed sequences, block masks) are not seen
by the chosen layers, which apply causal + key-padding masking only. Dropout in the chosen layers
is not applied. Generation outside the blocks is unaffected (SDPA).

Distillation. A reference recorded by one model can be compared against by another, as long as
the token sequences (and the number of chosen layers) match: a teacher's ``AttentionPolicy``
records, the student's compares. Head count, kv-head count, head dim and softmax scale may
differ; the i-th chosen layer of the student is compared with the i-th recorded layer.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence

import torch
from torch import Tensor, nn

from .. import ops

__all__ = ["AttentionPolicy", "AttentionReference", "LayerReference", "Comparison", "register",
           "ral_attention_forward", "IMPLEMENTATION"]

IMPLEMENTATION = "ral"


# ----------------------------------------------------------------------------------------------
# Cached reference
# ----------------------------------------------------------------------------------------------

@dataclass
class LayerReference:
    """One recorded layer: q (B, Hr, S, Dr), k (B, Hrkv, S, Dr), stats (B, Hr, S, 2) float32."""

    q: Tensor
    k: Tensor
    stats: Optional[Tensor]
    scale: float

    def select(self, index) -> "LayerReference":
        return LayerReference(self.q[index], self.k[index],
                              None if self.stats is None else self.stats[index], self.scale)

    def to(self, device=None, dtype=None) -> "LayerReference":
        """Move q, k (and stats, kept float32) to ``device``; cast q, k to ``dtype``."""
        stats = None if self.stats is None else self.stats.to(device=device)
        return LayerReference(self.q.to(device=device, dtype=dtype), self.k.to(device=device, dtype=dtype),
                              stats, self.scale)


@dataclass
class AttentionReference:
    """The cached attention reference of a recorded batch: one ``LayerReference`` per chosen layer.

    ``key_padding_mask`` (B, S) bool is the padding the reference (and its ``stats``) was recorded
    with; ``compare`` uses it when the model call gives no mask. Index with a batch index
    (``reference[idx]``) to get a minibatch, concatenate with ``AttentionReference.cat``.
    """

    layers: List[LayerReference]
    key_padding_mask: Optional[Tensor] = None

    def __getitem__(self, index) -> "AttentionReference":
        return AttentionReference([layer.select(index) for layer in self.layers],
                                  None if self.key_padding_mask is None else self.key_padding_mask[index])

    def __len__(self) -> int:
        return self.layers[0].q.shape[0] if self.layers else 0

    def to(self, device=None, dtype=None) -> "AttentionReference":
        """Move to ``device`` (e.g. offload to CPU between rollout and update); cast q, k to ``dtype``."""
        mask = None if self.key_padding_mask is None else self.key_padding_mask.to(device=device)
        return AttentionReference([layer.to(device, dtype) for layer in self.layers], mask)

    @staticmethod
    def cat(refs: Sequence["AttentionReference"]) -> "AttentionReference":
        """Concatenate references recorded on batches with the same sequence length."""
        layers = []
        for parts in zip(*(r.layers for r in refs)):
            stats = None if any(p.stats is None for p in parts) else torch.cat([p.stats for p in parts])
            layers.append(LayerReference(torch.cat([p.q for p in parts]), torch.cat([p.k for p in parts]),
                                         stats, parts[0].scale))
        masks = [r.key_padding_mask for r in refs]
        if all(m is None for m in masks):
            mask = None
        else:
            mask = torch.cat([m if m is not None else torch.ones(len(r), r.layers[0].k.shape[2], dtype=torch.bool,
                                                                 device=r.layers[0].k.device)
                              for m, r in zip(masks, refs)])
        return AttentionReference(layers, mask)

    def to_dict(self, prefix: str = "ral_") -> Dict[str, Tensor]:
        """Flat {name: tensor with batch dim first}, for trainers that shuffle / split tensor dicts
        (TRL). Scales go in a 1-D tensor without a batch dim: keep ``prefix + "scales"`` aside."""
        out: Dict[str, Tensor] = {}
        for i, layer in enumerate(self.layers):
            out[f"{prefix}q{i}"], out[f"{prefix}k{i}"] = layer.q, layer.k
            if layer.stats is not None:
                out[f"{prefix}stats{i}"] = layer.stats
        if self.key_padding_mask is not None:
            out[f"{prefix}kpm"] = self.key_padding_mask
        return out

    def scales(self) -> List[float]:
        return [layer.scale for layer in self.layers]

    @staticmethod
    def from_dict(tensors: Dict[str, Tensor], scales: Sequence[float], prefix: str = "ral_") -> "AttentionReference":
        """Inverse of ``to_dict`` (any batch subset of it) given ``scales()``."""
        layers = [LayerReference(tensors[f"{prefix}q{i}"], tensors[f"{prefix}k{i}"],
                                 tensors.get(f"{prefix}stats{i}"), float(scale)) for i, scale in enumerate(scales)]
        return AttentionReference(layers, tensors.get(f"{prefix}kpm"))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers
                   for t in (layer.q, layer.k, layer.stats) if t is not None)


@dataclass
class Recording:
    """Handle yielded by ``AttentionPolicy.record``; ``.reference`` is filled when the block ends."""

    reference: Optional[AttentionReference] = None
    _layers: Dict[int, List[LayerReference]] = field(default_factory=dict)
    _masks: List[Optional[Tensor]] = field(default_factory=list)


@dataclass
class Comparison:
    """Handle yielded by ``AttentionPolicy.compare``.

    ``per_layer``: {layer index: div (B, S) float32}; ``div``: their mean over the chosen layers
    (just the layer's own div with one layer, the default). Differentiable.
    """

    per_layer: Dict[int, Tensor] = field(default_factory=dict)

    @property
    def div(self) -> Tensor:
        if not self.per_layer:
            raise RuntimeError("no chosen layer ran inside the compare block; call the model inside it")
        values = list(self.per_layer.values())
        return values[0] if len(values) == 1 else torch.stack(values).mean(0)


# ----------------------------------------------------------------------------------------------
# The attention function
# ----------------------------------------------------------------------------------------------

def _sdpa(*args, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    return sdpa_attention_forward(*args, **kwargs)


def ral_attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                          attention_mask: Optional[Tensor], scaling: Optional[float] = None,
                          dropout: float = 0.0, **kwargs):
    """transformers attention function (query (B, H, S, D) -> (B, S, H, Dv), None).

    Layers marked by an ``AttentionPolicy`` that is recording or comparing run the fused op;
    every other call is forwarded to transformers' SDPA attention untouched.
    """
    hook = getattr(module, "_ral_policy", None)
    policy = hook[0] if hook is not None else None
    if policy is None or policy._mode is None:
        return _sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    return policy._attend(hook[1], module, query, key, value, scaling)


def _ral_mask(*args, **kwargs):
    from transformers.masking_utils import sdpa_mask
    return sdpa_mask(*args, **kwargs)


def register() -> None:
    """Register ``"ral"`` in transformers' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    AttentionInterface.register(IMPLEMENTATION, ral_attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION, _ral_mask)


def _decoder_attention_modules(model: nn.Module) -> List[nn.Module]:
    """Causal self-attention modules with a ``layer_idx`` (decoder layers), in layer order."""
    found = [m for m in model.modules()
             if isinstance(getattr(m, "layer_idx", None), int) and getattr(m, "is_causal", False)
             and hasattr(m, "scaling")]
    return sorted(found, key=lambda m: m.layer_idx)


def _is_checkpointing_layer(module: nn.Module) -> bool:
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:
        return False
    return isinstance(module, GradientCheckpointingLayer)


def _row_mask_full(row_mask: Optional[Tensor], seq_len: int) -> Optional[Tensor]:
    if row_mask is None:
        return None
    row_mask = row_mask.to(torch.bool)
    if row_mask.shape[1] == seq_len:
        return row_mask
    if row_mask.shape[1] > seq_len:
        raise ValueError(f"row_mask: length {row_mask.shape[1]} exceeds the sequence length {seq_len}")
    full = row_mask.new_zeros(row_mask.shape[0], seq_len)
    full[:, seq_len - row_mask.shape[1]:] = row_mask     # completion = the last C positions
    return full


class AttentionPolicy:
    """The attention policy of a transformers model's chosen decoder layers (RAL, Eq. 2-3).

    Args:
        model: a transformers ``PreTrainedModel`` (decoder-only LM or VLM such as Qwen2.5-VL).
            It is switched to ``attn_implementation="ral"`` (``set_attn_implementation``).
        layers: indices of the decoder layers whose attention is the policy; negative counts from
            the end. Default ``(-1,)``: the last layer (the paper).
        divergence, heads, exclude_self, backend: passed to ``ral.ops.attention_kl``
            (defaults: JSD of the head-averaged, self-excluded, renormalised attention).
        record_stats: in ``record``, compute the layer outputs with the op as well, which also
            gives the reference row statistics; so old and new log-probs come from the same kernel
            (ratio exactly 1 before the first update). False: SDPA outputs, stats computed later.

    Use ``record()`` to cache a reference and ``compare(reference, row_mask=...)`` to get the
    differentiable per-token divergence; see the module docstring. ``remove()`` undoes the hooks.
    """

    def __init__(self, model: nn.Module, layers: Sequence[int] = (-1,), *, divergence: str = "jsd",
                 heads: str = "mean", exclude_self: bool = True, backend: str = "auto",
                 record_stats: bool = True):
        register()
        if getattr(getattr(model, "config", None), "_attn_implementation", None) != IMPLEMENTATION:
            model.set_attn_implementation(IMPLEMENTATION)
        self.model = model
        self.divergence, self.heads, self.exclude_self = divergence, heads, exclude_self
        self.backend, self.record_stats = backend, record_stats
        modules = _decoder_attention_modules(model)
        if not modules:
            raise ValueError("model: found no causal decoder attention module (with layer_idx)")
        n = len(modules)
        idx = []
        for layer in layers:
            if not -n <= layer < n:
                raise ValueError(f"layers: index {layer} out of range for {n} decoder layers")
            idx.append(layer % n)
        self.layers = tuple(idx)
        self.modules = [modules[i] for i in self.layers]
        # decoder layers holding the chosen attention modules (their activation checkpointing is
        # paused during compare: a recomputation after the block would run SDPA, not the op)
        self._holders = [m for m in model.modules() if _is_checkpointing_layer(m) and
                         any(sub is mod for sub in m.modules() for mod in self.modules)]
        for slot, module in enumerate(self.modules):
            module._ral_policy = (self, slot)
        self._mode: Optional[str] = None
        self._state = None
        self._attention_mask: Optional[Tensor] = None
        self._explicit_mask = False
        self._hook = model.register_forward_pre_hook(self._capture_mask, with_kwargs=True)

    # -- mask capture -----------------------------------------------------------------------
    def _capture_mask(self, module, args, kwargs):
        if self._mode is None or self._explicit_mask:
            return None
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1 and isinstance(args[1], Tensor):
            mask = args[1]
        self._attention_mask = mask if mask is not None and mask.dim() == 2 else None
        return None

    def _key_padding(self, key: Tensor) -> Optional[Tensor]:
        mask = self._attention_mask
        if mask is None and self._mode == "compare" and self._state[0].key_padding_mask is not None:
            mask = self._state[0].key_padding_mask
        if mask is None:
            return None
        mask = mask.to(device=key.device, dtype=torch.bool)
        if mask.shape != (key.shape[0], key.shape[2]):
            raise ValueError(f"attention_mask: shape {tuple(mask.shape)} does not match the keys' "
                             f"(B, S) = {(key.shape[0], key.shape[2])}; record/compare need full-sequence "
                             f"calls without a KV cache")
        return None if bool(mask.all()) else mask

    # -- modes --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def record(self, attention_mask: Optional[Tensor] = None) -> Iterator[Recording]:
        """Cache the chosen layers' q, k and stats during the model calls in this block.

        Run it under ``torch.no_grad()`` (the cache is detached anyway). Several model calls
        (batch chunks with the same sequence length, as TRL's old-log-prob loop makes) are
        concatenated along the batch. Yields a ``Recording``; its ``.reference`` (an
        ``AttentionReference``) is set on exit.
        """
        rec = Recording()
        with self._active("record", rec, attention_mask):
            yield rec
        if len(rec._layers) != len(self.modules):
            raise RuntimeError("record: the chosen layers did not run; call the model inside the block")
        chunks = []
        for c, mask in enumerate(rec._masks):
            layers = [rec._layers[i][c] for i in range(len(self.modules))]
            chunks.append(AttentionReference(layers, None if mask is None else mask.to(torch.bool)))
        rec.reference = chunks[0] if len(chunks) == 1 else AttentionReference.cat(chunks)
        self._attention_mask = None

    @contextlib.contextmanager
    def compare(self, reference: AttentionReference, row_mask: Optional[Tensor] = None,
                attention_mask: Optional[Tensor] = None) -> Iterator[Comparison]:
        """Compute each chosen layer's divergence from ``reference`` during the model call.

        Args:
            reference: recorded on the same token sequences (same B, S; any model).
            row_mask: (B, S) or (B, C) bool, the rows whose divergence counts (response tokens);
                (B, C) is right-aligned to the last C positions. None: every row.
            attention_mask: (B, S) 2-D padding mask; default the one given to the model call,
                else the reference's.
        Yields a ``Comparison``: ``.div`` (B, S) float32 differentiable.
        """
        if len(reference.layers) != len(self.modules):
            raise ValueError(f"reference: has {len(reference.layers)} layers, the policy chooses "
                             f"{len(self.modules)}")
        cmp = Comparison()
        with self._active("compare", (reference, row_mask, cmp), attention_mask):
            yield cmp
        self._attention_mask = None

    @contextlib.contextmanager
    def _active(self, mode, state, attention_mask):
        if self._mode is not None:
            raise RuntimeError(f"AttentionPolicy is already in {self._mode!r} mode")
        self._mode, self._state = mode, state
        self._explicit_mask = attention_mask is not None
        self._attention_mask = attention_mask
        paused = []
        if mode == "compare":
            for holder in self._holders:
                if holder.gradient_checkpointing is True:
                    holder.gradient_checkpointing = False
                    paused.append(holder)
        try:
            yield
        finally:
            self._mode, self._state, self._explicit_mask = None, None, False
            for holder in paused:
                holder.gradient_checkpointing = True

    def remove(self) -> None:
        """Detach from the model (the model keeps attn_implementation="ral", which acts as SDPA)."""
        self._hook.remove()
        for module in self.modules:
            if getattr(module, "_ral_policy", (None,))[0] is self:
                del module._ral_policy

    # -- the chosen layers ----------------------------------------------------------------------
    def _attend(self, slot: int, module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                scaling: Optional[float]):
        scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
        if query.dtype != value.dtype or key.dtype != value.dtype:
            # under autocast, rotary embeddings leave q/k in fp32 while v is bf16/fp16: compute in
            # v's dtype, as SDPA does under autocast
            query, key = query.to(value.dtype), key.to(value.dtype)
        kpm = self._key_padding(key)
        opts = dict(divergence=self.divergence, heads=self.heads, exclude_self=self.exclude_self,
                    causal=True, key_padding_mask=kpm, backend=self.backend)
        if self._mode == "record":
            q_ref, k_ref = query.detach(), key.detach()
            if self.record_stats:
                res = ops.attention_kl(q_ref, k_ref, value.detach(), q_ref=q_ref, k_ref=k_ref, scale=scale,
                                       ref_scale=scale, **opts)
                out, stats = res.out, res.stats
            else:
                out = _sdpa_plain(module, query, key, value, kpm, scale)
                stats = None
            self._state._layers.setdefault(slot, []).append(LayerReference(q_ref, k_ref, stats, scale))
            if slot == 0:
                self._state._masks.append(kpm)
            return out.transpose(1, 2).contiguous(), None
        reference, row_mask, cmp = self._state
        ref = reference.layers[slot]
        if ref.q.shape[0] != query.shape[0] or ref.q.shape[2] != query.shape[2]:
            raise ValueError(f"reference: recorded (B, S) = {(ref.q.shape[0], ref.q.shape[2])}, the model "
                             f"call has {(query.shape[0], query.shape[2])}")
        res = ops.attention_kl(query, key, value, q_ref=ref.q, k_ref=ref.k, ref_stats=ref.stats, scale=scale,
                               ref_scale=ref.scale, row_mask=_row_mask_full(row_mask, query.shape[2]), **opts)
        cmp.per_layer.setdefault(self.layers[slot], res.div)
        return res.out.transpose(1, 2).contiguous(), None


def _sdpa_plain(module, query, key, value, kpm, scale):
    """(B, H, S, D) causal SDPA with GQA and key padding -> (B, H, S, Dv)."""
    group = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(group, dim=1)
    value = value.repeat_interleave(group, dim=1)
    s = query.shape[2]
    causal = torch.ones(s, s, dtype=torch.bool, device=query.device).tril()
    mask = causal[None, None] if kpm is None else causal[None, None] & kpm[:, None, None, :]
    mask = mask | ~mask.any(-1, keepdim=True)          # fully masked rows: anything finite
    return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)
