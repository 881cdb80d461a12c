"""transformers integration: an attention implementation named ``"ral"`` and ``AttentionPolicy``.

``AttentionPolicy(model)`` registers ``"ral"`` in transformers' ``AttentionInterface`` (and the
same 4-D boolean mask as SDPA in ``AttentionMaskInterface``), switches the model to it, and marks
the chosen decoder layers (default: the last one, as in the paper). Every other layer, every
vision-tower / encoder attention, and the chosen layers outside a ``record`` / ``compare`` block
(generation, evaluation) run SDPA unchanged. A model on another implementation X
(flash_attention_2, flex_attention) is switched to ``"ral+X"`` instead, which runs X wherever
``"ral"`` would run SDPA (``register``).

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

Attention statistics. ``AttentionPolicy(model, stats=True)`` makes ``compare`` return, from the
same op call, the entropy of the current policy and its mass per key segment (``Comparison.entropy``
(B, S), ``.mass`` (B, S, num_segments), 0 off row_mask); ``observe()`` computes them alone, without a
reference. Segment ids: the caller's ``key_segments`` (B, S) with ``segment_names``, or for a VLM
whose config has ``image_token_id`` / ``video_token_id`` (Qwen2.5-VL) the call's input ids mapped to
0 text, 1 image, 2 video (``token_segments``); otherwise the entropy alone::

    policy = AttentionPolicy(vlm, stats=True)
    with policy.compare(reference, row_mask=response_mask) as cmp:
        vlm(input_ids, attention_mask=attention_mask, pixel_values=pixels, image_grid_thw=grid)
    cmp.mass_by_segment()["image"]               # (B, S): each response row's attention on the image

Masks. Padding (left or right) comes from the model's 2-D ``attention_mask``, captured from the
model call (or passed explicitly to ``record`` / ``compare``) and handed to the op as
``key_padding_mask``. ``row_mask`` marks the rows (tokens) whose divergence counts, usually the
response tokens: (B, S) over the whole sequence, or (B, C) over its last C positions (TRL's
``completion_mask`` when ``input_ids = cat(prompt_ids, completion_ids)``). A padding token is never
a row: its div, entropy and mass are 0 whatever ``row_mask`` says (a right-padded token's query
would otherwise attend the real keys before it).

Packed sequences (padding-free batches). When a call packs several sequences into one row,
the chosen layers record and compare per sequence through ``ral.ops.attention_kl_varlen`` and
every other decoder layer runs SDPA with a block-diagonal causal mask. transformers tells the
attention function about packing in one of two ways (``packed_sequences`` reads both):

* ``position_ids`` that do not go up by one (they restart at 0 where a sequence starts), with no
  2-D padding mask: the input of ``transformers.masking_utils.find_packed_sequence_indices``. VL
  models hand the attention function their *text* positions only: Qwen2.5-VL needs
  ``position_ids`` of shape (4, B, T) (text row first, then the three M-RoPE rows), Qwen3-VL takes
  (B, T) or (4, B, T); with (3, B, T) M-RoPE positions alone packing is not visible.
* the ``cu_seq_lens_q`` / ``cu_seq_lens_k`` / ``max_length_q`` / ``max_length_k`` keyword
  arguments of the flash-attention path (``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``).

transformers builds the block-diagonal mask itself only for packed ``position_ids`` with
``use_cache=False``; with a cache object (the default ``use_cache=True``), or with
``cu_seq_lens_*`` alone, it hands SDPA no mask at all. The "ral" attention function then builds
the block-diagonal mask from the packing, so every layer attends per sequence either way. (A mask
transformers does hand over is used as it is: sliding-window layers of a packed call with a cache
get a sliding mask across sequences, as with transformers' own SDPA; pass ``use_cache=False``.)
``record`` on a packed call stores a packed reference (q, k, stats of shape (T, heads, dim) and
the ``Packing``); ``compare`` needs a call packed the same way, and ``Comparison.div`` has the
shape of the input ids, (1, T) for one packed row. A call with B > 1 packed rows is flattened
batch-major (T = B * S; with position ids every row starts a sequence).

Limits. Record / compare calls must be full-sequence passes without a KV cache (incremental
decoding and ``generate`` inside a block are refused with a ValueError) with a 2-D padding mask or
packed sequences (not both): the chosen layers apply causal + key-padding (or per-sequence) masking
only, so a model call inside a block with any other ``attention_mask`` (a custom 4-D mask, a mask
per layer type) is refused with a ValueError, and so is a compare on other padding than the record
call's. Dropout in the chosen layers is not applied. A chosen layer whose attention is more than
scaled dot products is refused with a ValueError naming it (soft-capping, sinks, a position bias),
and so is a sliding-window chosen layer on a call with a sequence longer than its window, or a
chunked-attention one (Llama 4) on a call longer than its chunk (the op attends every earlier key;
within a window or chunk the two agree); choose a full-attention layer. Other layers keep their
windows and chunks (transformers' SDPA mask). Where the mask transformers builds for a chosen layer
is not causal at some rows (Gemma 3's bidirectional image blocks from ``token_type_ids``; of a
packed call: not causal within a row's own sequence, keys of other sequences not compared), those
rows get transformers' SDPA under that mask (packed: within the row's sequence), and the policy
must not be read there (``row_mask``; a ValueError names the row); under ``cp_group`` such a call is
refused on every rank (context parallelism is causal). The chosen layer follows the model's mask
as the other layers do, also where transformers builds it wrong: transformers 5.25 looks up a
packed Gemma 3 row's image blocks by position id, not by index, so a later sequence whose image
sits at other positions than the first's gets misplaced blocks (its own packed call is then 0.26
off the sequence run alone); feed Gemma 3 VLMs padded batches. A model transformers cannot run on SDPA
(``_supports_sdpa`` False) is refused when the policy is made. Generation outside the blocks is
unaffected (SDPA).

Context parallelism (long sequences over a process group). ``AttentionPolicy(model,
cp_group=group, cp_layout="zigzag")``: every model call inside ``record`` / ``compare`` / ``observe``
is on this rank's shard of the sequence, and the chosen layers run ``ral.distributed.attention_kl_cp``
(this rank's rows with all heads, keys gathered over the group), so div, entropy and mass of the
local rows equal the single-process ones::

    from ral.distributed import shard
    def local(t):                                     # this rank's positions of a (B, S, ...) tensor
        return shard(t, 1, group, "zigzag")
    call = dict(input_ids=local(input_ids), attention_mask=local(attention_mask),
                position_ids=local(torch.arange(S, device=device)[None]))   # global positions: RoPE
    with torch.no_grad(), policy.record() as rec:
        model(**call)
    with policy.compare(rec.reference, row_mask=local(response_mask)) as cmp:
        logits = model(**call).logits                 # (B, S_r, V): this rank's rows
    (per_token_loss(logits) + lam * cmp.div).sum().backward()    # this rank's rows
    # then sum the parameter gradients over the group (the whole sequence's loss is the sum over ranks)

The model's local 4-D mask is ignored by the chosen layers (it was built for S_r positions); the key
padding comes from the 2-D mask shard and is gathered inside the op. References, ``row_mask``,
``key_segments`` and every ``Comparison`` tensor are this rank's shards (B, S_r). Only the chosen
layers are parallelised here: every other attention layer of the model must be sequence parallel by
other means (a model whose only attention layer is the chosen one, as in tests/test_cp_integration.py,
needs nothing else). Packed sequences under ``cp_group``: one packed row (B = 1) sharded like any
sequence, with its position ids (that restart at each sequence) sharded the same way; the position
ids are gathered to find the whole stream's packing and the chosen layers run
``ral.distributed.attention_kl_cp_varlen`` (a reference recorded so is the rank's shard of the packed
stream, with the whole stream's ``packing``). Refused with a ValueError: the flash-attention
``cu_seq_lens_*`` kwargs, packed position ids with B > 1, and position ids equal to each rank's own
0 .. S_r - 1 (forgotten global positions).

Distillation. A reference recorded by one model can be compared against by another, as long as
the token sequences (and the number of chosen layers) match: a teacher's ``AttentionPolicy``
records, the student's compares. Head count, kv-head count, head dim and softmax scale may
differ; the i-th chosen layer of the student is compared with the i-th recorded layer.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.modeling_layers import GradientCheckpointingLayer

from .. import ops
from ..checks import check_choice, check_flag
from ..distributed import LAYOUTS, GatheredKeys, attention_kl_cp, attention_kl_cp_varlen, chunks, prefetch_keys, unshard
from .packing import (Packing, flat_tokens, key_windows, one_sequence, packed_places, packed_sequences,
                      packing_from_positions, sdpa_packed)

__all__ = ["AttentionPolicy", "AttentionReference", "LayerReference", "Comparison", "Packing",
           "packed_sequences", "register", "ral_attention_forward", "token_segments", "IMPLEMENTATION",
           "VL_SEGMENTS"]

IMPLEMENTATION = "ral"


# ----------------------------------------------------------------------------------------------
# Key segments (attention statistics)
# ----------------------------------------------------------------------------------------------

VL_SEGMENTS = ("text", "image", "video")


def token_segments(input_ids: Tensor, image_token_id: Optional[int], video_token_id: Optional[int] = None) -> Tensor:
    """(B, S) token ids -> (B, S) int64 segment ids: 0 text, 1 image, 2 video (``VL_SEGMENTS``).

    A VLM's processor expands every image (video) into placeholder tokens, one per merged patch
    (Qwen2.5-VL: ``<|image_pad|>`` = ``config.image_token_id``, ``<|video_pad|>`` =
    ``config.video_token_id``), whose embeddings the model replaces by the visual features: those
    positions are the image (video) keys. A token id of None matches nothing.
    """
    seg = torch.zeros(input_ids.shape, dtype=torch.long, device=input_ids.device)
    for value, token in ((1, image_token_id), (2, video_token_id)):
        if token is not None:
            seg = seg.masked_fill(input_ids == token, value)
    return seg


def _vision_token_ids(model: nn.Module) -> Optional[Tuple[Optional[int], Optional[int]]]:
    """(image_token_id, video_token_id) of a VLM's config, or None for a model without them."""
    config = getattr(model, "config", None)
    ids = tuple(getattr(config, name, None) for name in ("image_token_id", "video_token_id"))
    return ids if any(isinstance(i, int) for i in ids) else None


def _segment_names(segment_names, vision_tokens) -> Optional[Tuple[str, ...]]:
    if segment_names is None:
        return VL_SEGMENTS if vision_tokens is not None else None
    if isinstance(segment_names, str) or not all(isinstance(n, str) for n in segment_names):
        raise TypeError(f"segment_names must be a sequence of str (one name per segment id), got {segment_names!r}")
    names = tuple(segment_names)
    if not 1 <= len(names) <= ops.MAX_SEGMENTS or len(set(names)) != len(names):
        raise ValueError(f"segment_names must hold 1..{ops.MAX_SEGMENTS} distinct names, got {names!r}")
    return names


def _unpack_rows(t: Optional[Tensor], batch: int, seq: int, heads_each: bool) -> Optional[Tensor]:
    """A packed per-row result of the varlen op, (T, ...) or with heads="each" (T, H, ...), ->
    the dense op's layout over the input ids: (B, S, ...) or (B, H, S, ...)."""
    if t is None:
        return None
    t = t.reshape(batch, seq, *t.shape[1:])
    return t.movedim(2, 1) if heads_each else t


# ----------------------------------------------------------------------------------------------
# Cached reference
# ----------------------------------------------------------------------------------------------

@dataclass
class LayerReference:
    """One recorded layer: q (B, Hr, S, Dr), k (B, Hrkv, S, Dr), stats (B, Hr, S, 2) float32; of a
    packed call (``AttentionReference.packing`` set): q (T, Hr, Dr), k (T, Hrkv, Dr), stats (T, Hr, 2)."""

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

    ``packing`` is set when the reference was recorded on packed sequences: then q, k, stats are
    packed (T, heads, dim), there is no padding mask, ``compare`` needs a call packed the same way,
    and the reference cannot be indexed (``cat`` appends packed streams).

    Recorded by a policy with ``cp_group`` (context parallelism), it is the recording rank's shard:
    q, k, stats and key_padding_mask hold that rank's S_r positions in the policy's layout (indexing
    and ``cat`` act on the batch dim as usual); compare with it on the same rank, group and layout.
    A packed one (the rank's T_r tokens, the whole stream's ``packing``) cannot be concatenated.
    """

    layers: List[LayerReference]
    key_padding_mask: Optional[Tensor] = None
    packing: Optional[Packing] = None

    def __getitem__(self, index) -> "AttentionReference":
        if self.packing is not None:
            raise ValueError("reference: a packed reference is one stream of sequences and cannot be indexed "
                             "by batch rows; record and compare each packed micro-batch as a whole")
        return AttentionReference([layer.select(index) for layer in self.layers],
                                  None if self.key_padding_mask is None else self.key_padding_mask[index])

    def __len__(self) -> int:
        """Batch rows; for a packed reference, the number of sequences."""
        if self.packing is not None:
            return self.packing.cu_seqlens_q.shape[0] - 1
        return self.layers[0].q.shape[0] if self.layers else 0

    def to(self, device=None, dtype=None) -> "AttentionReference":
        """Move to ``device`` (e.g. offload to CPU between rollout and update); cast q, k to ``dtype``."""
        mask = None if self.key_padding_mask is None else self.key_padding_mask.to(device=device)
        packing = None if self.packing is None or device is None else self.packing.to(device)
        return AttentionReference([layer.to(device, dtype) for layer in self.layers], mask,
                                  self.packing if packing is None else packing)

    @staticmethod
    def cat(refs: Sequence["AttentionReference"]) -> "AttentionReference":
        """Concatenate references recorded on batches with the same sequence length, or packed
        references (their streams are appended)."""
        if any(r.packing is not None for r in refs):
            return AttentionReference._cat_packed([r._as_packed() for r in refs])
        layers = _cat_layers(refs)
        masks = [r.key_padding_mask for r in refs]
        if all(m is None for m in masks):
            mask = None
        else:
            mask = torch.cat([m if m is not None else torch.ones(len(r), r.layers[0].k.shape[2], dtype=torch.bool,
                                                                 device=r.layers[0].k.device)
                              for m, r in zip(masks, refs)])
        return AttentionReference(layers, mask)

    def _as_packed(self) -> "AttentionReference":
        """A one-row reference without padding as one packed sequence (a packed micro-batch that
        holds a single sequence is recorded as such a row)."""
        if self.packing is not None:
            return self
        q = self.layers[0].q
        if q.shape[0] != 1 or (self.key_padding_mask is not None and not bool(self.key_padding_mask.all())):
            raise ValueError("reference: cannot concatenate packed references with padded batches")
        layers = [LayerReference(flat_tokens(layer.q), flat_tokens(layer.k), None if layer.stats is None else flat_tokens(layer.stats),
                                 layer.scale) for layer in self.layers]
        return AttentionReference(layers, None, one_sequence(q.shape[2], q.device))

    @staticmethod
    def _cat_packed(refs: Sequence["AttentionReference"]) -> "AttentionReference":
        layers = _cat_layers(refs)
        cus = []
        for which in ("cu_seqlens_q", "cu_seqlens_k"):
            pieces, offset = [], 0
            for i, r in enumerate(refs):
                cu = getattr(r.packing, which)
                pieces.append((cu if i == 0 else cu[1:]) + offset)
                offset += int(cu[-1])
            cus.append(torch.cat(pieces))
        packing = Packing(cus[0], cus[1], max(r.packing.max_seqlen_q for r in refs),
                          max(r.packing.max_seqlen_k for r in refs))
        return AttentionReference(layers, None, packing)

    def to_dict(self, prefix: str = "ral_") -> Dict[str, Tensor]:
        """Flat {name: tensor with batch dim first}, for trainers that shuffle / split tensor dicts
        (TRL). Scales go in a 1-D tensor without a batch dim: keep ``prefix + "scales"`` aside."""
        if self.packing is not None:
            raise ValueError("reference: a packed reference has no batch dim to split; keep it as it is")
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


def _cat_layers(refs: Sequence[AttentionReference]) -> List[LayerReference]:
    """Each chosen layer's q, k (and stats, None if any part has none) concatenated along dim 0."""
    layers = []
    for parts in zip(*(r.layers for r in refs)):
        stats = None if any(p.stats is None for p in parts) else torch.cat([p.stats for p in parts])
        layers.append(LayerReference(torch.cat([p.q for p in parts]), torch.cat([p.k for p in parts]),
                                     stats, parts[0].scale))
    return layers


@dataclass
class Recording:
    """Handle yielded by ``AttentionPolicy.record``; ``.reference`` is filled when the block ends."""

    reference: Optional[AttentionReference] = None
    _layers: Dict[int, List[LayerReference]] = field(default_factory=dict)
    _masks: List[Optional[Tensor]] = field(default_factory=list)
    _packings: List[Optional[Packing]] = field(default_factory=list)


@dataclass
class Comparison:
    """Handle yielded by ``AttentionPolicy.compare`` (and ``observe``).

    ``per_layer``: {layer index: div (B, S) float32}; ``div``: their mean over the chosen layers
    (just the layer's own div with one layer, the default). Differentiable. (B, S) is the shape of
    the input ids, also for packed sequences: (1, T) for one packed row. heads="each": (B, H, S).

    With statistics (``AttentionPolicy(stats=True)``, a call's ``key_segments``, or ``observe``),
    from the same op call: ``per_layer_entropy`` {layer: (B, S)} and ``per_layer_mass`` {layer:
    (B, S, num_segments)} (heads="each": (B, H, S) and (B, H, S, num_segments)), float32,
    differentiable, 0 on rows outside row_mask and on rows with an empty support; ``entropy`` and
    ``mass`` their means over the chosen layers (None without statistics; ``mass`` None when no
    segment ids were known). ``segment_names`` names the last dim of ``mass``.
    """

    per_layer: Dict[int, Tensor] = field(default_factory=dict)
    per_layer_entropy: Dict[int, Tensor] = field(default_factory=dict)
    per_layer_mass: Dict[int, Tensor] = field(default_factory=dict)
    segment_names: Optional[Tuple[str, ...]] = None

    @property
    def div(self) -> Tensor:
        if not self.per_layer:
            raise RuntimeError("no divergence: no chosen layer ran inside the compare block (call the model "
                               "inside it), or this is an observe block (statistics only)")
        return _layer_mean(self.per_layer)

    @property
    def entropy(self) -> Optional[Tensor]:
        return _layer_mean(self.per_layer_entropy) if self.per_layer_entropy else None

    @property
    def mass(self) -> Optional[Tensor]:
        return _layer_mean(self.per_layer_mass) if self.per_layer_mass else None

    def mass_by_segment(self) -> Dict[str, Tensor]:
        """{segment name: mass (B, S) (heads="each": (B, H, S))}; empty without segment ids."""
        mass = self.mass
        if mass is None:
            return {}
        return {name: mass[..., i] for i, name in enumerate(self.segment_names)}

    def statistics_columns(self) -> Tuple[List[str], Optional[Tensor]]:
        """The metric names ``ral/attn_entropy`` and ``ral/attn_mass/<segment>`` (the masses only
        when segment ids were known) and their values as the columns of one tensor, entropy first:
        (B, S, 1 + num_segments) (heads="each": (B, H, S, ...)), differentiable; ([], None) without
        statistics."""
        entropy = self.entropy
        if entropy is None:
            return [], None
        mass = self.mass
        if mass is None:
            return ["ral/attn_entropy"], entropy[..., None]
        names = ["ral/attn_entropy"] + [f"ral/attn_mass/{name}" for name in self.segment_names]
        return names, torch.cat([entropy[..., None], mass], -1)

    def _add(self, layer: int, div: Optional[Tensor], entropy: Optional[Tensor], mass: Optional[Tensor]) -> None:
        for store, value in ((self.per_layer, div), (self.per_layer_entropy, entropy), (self.per_layer_mass, mass)):
            if value is not None:
                store.setdefault(layer, value)


def _layer_mean(per_layer: Dict[int, Tensor]) -> Tensor:
    values = list(per_layer.values())
    return values[0] if len(values) == 1 else torch.stack(values).mean(0)


# ----------------------------------------------------------------------------------------------
# The attention function
# ----------------------------------------------------------------------------------------------

def ral_attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                          attention_mask: Optional[Tensor], scaling: Optional[float] = None,
                          dropout: float = 0.0, **kwargs):
    """transformers attention function (query (B, H, S, D) -> (B, S, H, Dv), None).

    Layers marked by an ``AttentionPolicy`` that is recording or comparing run the fused op;
    every other call goes to transformers' SDPA attention: untouched, except a causal call on
    packed sequences that transformers gave no mask (``packed_sequences``; see the module
    docstring), which gets the block-diagonal causal mask.
    """
    hook = _open_policy(module)
    if hook is not None:
        return hook[0]._attend(hook[1], module, query, key, value, scaling, kwargs, attention_mask)
    if attention_mask is None and _causal_call(module, kwargs):
        packing = packed_sequences(kwargs, query.shape[0], query.shape[2], key.shape[2])
        if packing is not None:
            return sdpa_packed(module, query, key, value, packing, scaling, dropout, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def _open_policy(module: nn.Module):
    """(policy, slot) of the ``AttentionPolicy`` whose record / compare / observe block is open on this
    attention module, or None. A module may be chosen by several policies (each keeps its entry in
    ``module._ral_policies`` until its ``remove()``); at most one of them may have a block open."""
    open_ = [hook for hook in getattr(module, "_ral_policies", ()) if hook[0]._mode is not None]
    if len(open_) > 1:
        raise ValueError(f"layers: decoder layer {module.layer_idx} is chosen by {len(open_)} AttentionPolicy "
                         f"objects whose blocks are open at once ({', '.join(h[0]._mode for h in open_)}); "
                         f"open one at a time")
    return open_[0] if open_ else None


def _causal_call(module: nn.Module, kwargs: dict) -> bool:
    """A causal (decoder) attention call; vision towers pass is_causal=False or have module.is_causal False."""
    is_causal = kwargs.get("is_causal")
    return bool(getattr(module, "is_causal", False)) if is_causal is None else bool(is_causal)


def register(original: Optional[str] = None) -> str:
    """Register ``"ral"`` in transformers' attention and mask interfaces (idempotent) and return the
    implementation a model on ``original`` runs with a policy attached.

    ``"ral"`` for None, "sdpa", "eager" or "ral": SDPA outside the chosen layers. For any other
    implementation X in transformers' registry (flash_attention_2, flex_attention, a custom one),
    ``"ral+X"``, registered here with X's mask function: the chosen layers run the op while a policy
    records, compares or observes, and X runs everywhere else, as it did before the policy (so a
    long-sequence model keeps its flash-attention layers). A ``"ral+X"`` name is returned as it is.
    """
    AttentionInterface.register(IMPLEMENTATION, ral_attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)
    if original is None or original in (IMPLEMENTATION, "sdpa", "eager"):
        return IMPLEMENTATION
    if original.startswith(IMPLEMENTATION + "+"):
        return original
    base = ALL_ATTENTION_FUNCTIONS[original]

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        if _open_policy(module) is not None:
            return ral_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                         dropout=dropout, **kwargs)
        return base(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)

    name = f"{IMPLEMENTATION}+{original}"
    AttentionInterface.register(name, attention)
    if original in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])
    return name


def _attention_modules(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """(name, module) of every attention module with a ``layer_idx`` and a ``scaling``, in model order."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(getattr(m, "layer_idx", None), int) and hasattr(m, "scaling")]


def _decoder_attention_modules(model: nn.Module) -> List[nn.Module]:
    """Causal self-attention modules with a ``layer_idx`` (decoder layers), in layer order."""
    found = [m for _, m in _attention_modules(model) if getattr(m, "is_causal", False)]
    return sorted(found, key=lambda m: m.layer_idx)


def _with_model_rows(out: Tensor, noncausal: Tensor, module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                     layer_mask: Tensor, scale: float, packing: Optional[Packing] = None) -> Tensor:
    """``out`` (B, H, Sq, Dv) with its rows in ``noncausal`` (B, Sq) bool replaced by transformers' SDPA
    under the layer's own mask, computed for those query rows only (the union over the batch: R rows,
    scores R x Sk): the model's numbers where its mask is not causal (e.g. Gemma 3's image blocks).
    A packed call (``packing``): the layer's mask within each row's own sequence only."""
    idx = noncausal.any(0).nonzero().squeeze(1).to(query.device)
    take = noncausal[:, idx].to(query.device)[:, None, :, None]                   # (B, 1, R, 1)
    # rows of the union that a batch row does not take (padding there, say) attend every key: a finite
    # output with no gradient, never a fully masked row's NaN
    sub_mask = layer_mask[..., idx, :]
    if packing is not None:
        seq_q, _, seq_k, _ = packed_places(packing, query.shape[0], query.shape[2], key.shape[2], query.device)
        own = (seq_q[:, idx, None] == seq_k[:, None, :])[:, None]                   # (B, 1, R, Sk)
        sub_mask = sub_mask & own if sub_mask.dtype == torch.bool else \
            torch.where(own, sub_mask, torch.finfo(sub_mask.dtype).min)
    sub_mask = sub_mask | ~take if sub_mask.dtype == torch.bool else sub_mask.masked_fill(~take, 0)
    model_rows, _ = sdpa_attention_forward(module, query[:, :, idx], key, value, sub_mask, dropout=0.0,
                                           scaling=scale)                           # (B, R, H, Dv)
    patched = torch.where(take.to(out.device), model_rows.transpose(1, 2).to(out.dtype), out[:, :, idx])
    return out.index_copy(2, idx, patched)


def _mask_block_disagrees(layer_mask: Tensor, kpm: Optional[Tensor], start: int, rows: int, offset: int,
                          later_only: bool = False, places: Optional[Tuple[Tensor, ...]] = None,
                          keys: Optional[Tuple[int, int]] = None) -> Tensor:
    """Query rows ``start .. start + rows`` of a 4-D layer mask (bool, or additive: 0 attended, the
    dtype's minimum not) against causal attention over the key padding ``kpm`` (B, Sk), query row i at
    key position i + offset -> (B | 1, heads | 1, r, Sk) bool, True where a real (non-padding) query
    row is masked otherwise or (additive) gets a value that is neither (a bias); ``later_only``: True
    only where it attends a later key (hidden keys and biases not counted). A packed call
    (``places``: ``packed_places``): causal within each row's own sequence, and only the keys of
    that sequence compared (the chosen layer attends per sequence whatever the mask says elsewhere),
    those in ``keys`` = (lo, hi) at most (the last dim is then hi - lo)."""
    lo, hi = keys if places is not None and keys is not None else (0, layer_mask.shape[-1])
    block = layer_mask[..., start:start + rows, lo:hi]
    if block.dtype == torch.bool:
        allowed, other = block, None
    else:
        allowed = block == 0
        other = ~(allowed | (block <= torch.finfo(block.dtype).min / 2))
    if places is not None:
        seq_q, pos_q, seq_k, pos_k = places
        part = slice(start, start + block.shape[-2])
        real = (seq_q[:, part, None] == seq_k[:, None, lo:hi])[:, None]              # (B, 1, r, hi - lo)
        want = real & (pos_k[:, None, None, lo:hi] <= pos_q[:, None, part, None])
    else:
        positions = torch.arange(start, start + block.shape[-2], device=block.device) + offset
        want = (torch.arange(block.shape[-1], device=block.device)[None, :] <= positions[:, None])[None, None]
        real = torch.ones(1, 1, positions.shape[0], 1, dtype=torch.bool, device=block.device)
        if kpm is not None:
            kpm = kpm.to(block.device)
            real = kpm[:, positions][:, None, :, None]
    if later_only:
        return allowed & ~want & real
    if kpm is not None:
        want = want & kpm[:, None, None, :]
    differ = (allowed != want) & real
    if other is not None:
        differ = differ | (other & real)
    return differ


def _attention_chunk(module: nn.Module, model: nn.Module) -> Optional[int]:
    """``attention_chunk_size`` of a chunked-attention decoder layer (``layer_types[i] ==
    "chunked_attention"``, Llama 4: a query attends only to keys of its own chunk, a rule transformers
    puts in that layer's mask and nowhere else), else None."""
    config = getattr(module, "config", None)
    if config is None:
        config = getattr(model, "config", None)
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
    types = getattr(config, "layer_types", None)
    if not types or module.layer_idx >= len(types) or types[module.layer_idx] != "chunked_attention":
        return None
    chunk = getattr(config, "attention_chunk_size", None)
    return int(chunk) if chunk else None


def _is_checkpointing_layer(module: nn.Module) -> bool:
    return isinstance(module, GradientCheckpointingLayer)


def _row_mask_full(row_mask: Optional[Tensor], seq_len: int, kpm: Optional[Tensor] = None) -> Optional[Tensor]:
    """The rows the policy is read at, (B, seq_len) bool or None (every row): ``row_mask`` (B, S) or
    right-aligned (B, C) (a completion mask), and with the call's key padding ``kpm`` (B, S) only
    the real tokens' rows (a padding token is no row: a right-padded one would attend real keys)."""
    real = None if kpm is None else kpm[:, kpm.shape[1] - seq_len:]
    if row_mask is None:
        return real
    row_mask = row_mask.to(torch.bool)
    if row_mask.shape[1] > seq_len:
        raise ValueError(f"row_mask: length {row_mask.shape[1]} exceeds the sequence length {seq_len}")
    full = row_mask
    if row_mask.shape[1] < seq_len:
        full = row_mask.new_zeros(row_mask.shape[0], seq_len)
        full[:, seq_len - row_mask.shape[1]:] = row_mask     # completion = the last C positions
    return full if real is None else full & real.to(full.device)


# Keyword arguments of transformers' attention call that change a layer's scores; the op computes plain
# scaled dot-product scores, so a chosen layer that gets one of them (not None) is refused
# (AttentionPolicy._check_layer).
_SCORE_KWARGS = {"softcap": "logit soft-capping (Gemma 2)", "s_aux": "attention sinks (gpt-oss)",
                 "position_bias": "an additive position bias"}


def _padding_mismatch(reference: AttentionReference, mask: Tensor) -> Optional[str]:
    """Why a compare call's (B, S) bool key padding ``mask`` cannot use ``reference`` (recorded over
    other keys: its row statistics would not normalise the reference attention over these), or None."""
    recorded = reference.key_padding_mask
    recorded = torch.ones_like(mask) if recorded is None else recorded.to(device=mask.device, dtype=torch.bool)
    if recorded.shape != mask.shape or torch.equal(recorded, mask):
        return None                       # a shape mismatch has its own error
    rows = (recorded != mask).any(1).nonzero().flatten().tolist()
    return (f"attention_mask: batch rows {rows} pad other keys than the reference was recorded with; compare on "
            f"the padding of the record call (or pass none: the reference's is used)")


class AttentionPolicy:
    """The attention policy of a transformers model's chosen decoder layers (RAL, Eq. 2-3).

    Args:
        model: a transformers ``PreTrainedModel`` (decoder-only LM or VLM such as Qwen2.5-VL).
            It is switched (``set_attn_implementation``) to ``register(its implementation)``: from
            "sdpa" or "eager" to ``"ral"``, which runs SDPA outside the chosen layers (a model
            transformers cannot run on SDPA, ``_supports_sdpa`` False: Gemma 2's soft-capping,
            gpt-oss's sinks, is then refused with a ValueError); from any other X (flash_attention_2,
            flex_attention) to ``"ral+X"``, which keeps X outside the chosen layers.
        layers: indices of the decoder layers whose attention is the policy; negative counts from
            the end. Default ``(-1,)``: the last layer (the paper). They index the layers with softmax
            attention: in a hybrid model (Qwen3-Next: three linear-attention layers, then one with
            softmax attention) ``-1`` is the last softmax-attention layer.
        divergence, heads, exclude_self, backend: passed to ``ral.ops.attention_kl``
            (defaults: JSD of the head-averaged, self-excluded, renormalised attention).
        record_stats: in ``record``, compute the layer outputs with the op as well, which also
            gives the reference row statistics; so old and new log-probs come from the same kernel
            (ratio exactly 1 before the first update). False: SDPA outputs, stats computed later.
        stats: in ``compare``, also return the entropy and the per-segment mass of the current
            policy (``Comparison.entropy`` / ``.mass``) from the same op call (docs/design.md,
            "Attention statistics"). ``observe`` always computes them; a call's ``key_segments``
            turns them on for that call. Off by default (only the cpu and reference backends compute them so far).
        segment_names: the names of segment ids 0, 1, ... (1..8 names); default ``VL_SEGMENTS``
            ("text", "image", "video") for a model whose config has ``image_token_id`` /
            ``video_token_id`` (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, ...), else None. With the default
            names the segment ids come from the model call's ``input_ids`` (``token_segments``);
            given names need the ids from the caller (``key_segments`` of ``compare`` / ``observe``).
            Without segment ids the op gives the entropy only (all keys one segment; mass None).
        cp_group: a ``torch.distributed`` process group for context parallelism (docs/design.md,
            "Context parallelism"), or None. Given, every model call inside ``record`` / ``compare`` /
            ``observe`` runs on this rank's shard of the sequence: the caller shards the inputs with
            ``ral.distributed.shard(x, 1, cp_group, cp_layout)`` (``input_ids`` or embeddings, the 2-D
            ``attention_mask``, ``row_mask``, ``key_segments``) and passes ``position_ids`` = the shard's
            global positions (``shard(arange(S)[None], 1, cp_group, cp_layout)``) so RoPE is right. The
            chosen layers then call ``ral.distributed.attention_kl_cp`` (all heads of the local rows,
            keys gathered over the group; the model's local 4-D mask is ignored, the key padding comes
            from the 2-D mask shard). Recorded references, ``Comparison`` results and ``row_mask`` are
            this rank's shards (B, S_r). Every other attention layer is the caller's to parallelise
            (a model whose only attention layer is the chosen one needs nothing else). One packed
            row (B = 1, position ids that restart, sharded like input_ids) runs
            ``attention_kl_cp_varlen``; ``cu_seq_lens_*`` kwargs and packed B > 1 raise ValueError.
            ``record_stats=False`` under CP still computes the recorded layer's output with the op.
        cp_layout: the layout of the shards, "zigzag" (default) or "contiguous" (``ral.distributed``).

    Use ``record()`` to cache a reference and ``compare(reference, row_mask=...)`` to get the
    differentiable per-token divergence; see the module docstring. ``remove()`` undoes the hooks.
    Several policies may choose the same layer of one model (each its own options); one block at a
    time may be open on it.
    """

    def __init__(self, model: nn.Module, layers: Sequence[int] = (-1,), *, divergence: str = "jsd",
                 heads: str = "mean", exclude_self: bool = True, backend: str = "auto",
                 record_stats: bool = True, stats: bool = False, segment_names: Optional[Sequence[str]] = None,
                 cp_group=None, cp_layout: str = "zigzag"):
        for name, value in (("stats", stats), ("exclude_self", exclude_self), ("record_stats", record_stats)):
            check_flag(name, value)
        for name, value, choices in (("divergence", divergence, ops.DIVERGENCES), ("heads", heads, ops.HEADS_MODES),
                                     ("backend", backend, ops.BACKENDS)):
            check_choice(name, value, choices)      # here, not at the first model call inside a block
        if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) or not layers \
                or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
            raise TypeError(f"layers must be a non-empty sequence of ints (decoder layer indices), got {layers!r}")
        _check_cp(cp_group, cp_layout)
        self.cp_group, self.cp_layout = cp_group, cp_layout
        vision_tokens = _vision_token_ids(model)
        self.segment_names = _segment_names(segment_names, vision_tokens)
        self.stats = stats
        # segment ids from the call's input ids: only with the default (VLM) names
        self._vision_tokens = vision_tokens if segment_names is None else None
        modules = _decoder_attention_modules(model)
        if not modules:
            bidirectional = [name for name, m in _attention_modules(model) if getattr(m, "is_causal", None) is False]
            raise ValueError(
                "model: found no causal decoder attention module (with layer_idx)" + (
                    f"; its attention layers ({bidirectional[0]}, ...) say is_causal=False: the model attends both "
                    f"ways (an encoder, a bidirectional prefix such as PaliGemma's, config.use_bidirectional_attention"
                    f"), and ral's policy is causal self-attention" if bidirectional else ""))
        n = len(modules)
        idx = []
        for layer in layers:
            if not -n <= layer < n:
                raise ValueError(f"layers: index {layer} out of range for the model's {n} softmax-attention "
                                 f"decoder layers (decoder layers {[m.layer_idx for m in modules]})")
            if layer % n in idx:
                raise ValueError(f"layers: {tuple(layers)} names softmax-attention layer {layer % n} twice "
                                 f"(of {n}; negative indices count from the end)")
            idx.append(layer % n)
        self.layers = tuple(idx)
        current = getattr(getattr(model, "config", None), "_attn_implementation", None)
        implementation = register(current)
        if implementation == IMPLEMENTATION and getattr(model, "_supports_sdpa", True) is False:
            raise ValueError(f"model: {type(model).__name__} has no SDPA attention in transformers (its "
                             f"attention needs more than SDPA computes, e.g. sinks or soft-capping), and on "
                             f"{current!r} the 'ral' implementation would run SDPA in every layer it does not "
                             f"compute; load it with an implementation that serves it (e.g. flash_attention_2)")
        if current != implementation:
            model.set_attn_implementation(implementation)
        self.model = model
        self.divergence, self.heads, self.exclude_self = divergence, heads, exclude_self
        self.backend, self.record_stats = backend, record_stats
        self.modules = [modules[i] for i in self.layers]
        self._attention_modules = modules
        # decoder layers holding the chosen attention modules (their activation checkpointing is
        # paused during compare: a recomputation after the block would not run the op)
        self._holders = [m for m in model.modules() if _is_checkpointing_layer(m) and
                         any(sub is mod for sub in m.modules() for mod in self.modules)]
        for slot, module in enumerate(self.modules):
            module._ral_policies = getattr(module, "_ral_policies", ()) + ((self, slot),)
        self._mode: Optional[str] = None
        self._state = None
        self._prefetched: Dict[int, GatheredKeys] = {}   # compare under cp_group: reference keys in flight
        # the chosen layers' computation replaced: (slot, module, query, key, value, scaling, kwargs) ->
        # (out, None); set by ral.integrations.verl under Ulysses sequence parallelism
        self._layer_override = None
        self._attention_mask: Optional[Tensor] = None
        self._input_ids: Optional[Tensor] = None
        self._explicit_mask = False
        # under cp_group: the group's answer for this model call's layout (_cp_call), kept for its other
        # chosen layers; (position ids, B, S_r, mask given, answer), cleared at each model call
        self._cp_answer: Optional[tuple] = None
        # the last layer mask compared with causal attention (_noncausal_rows), cleared at each model
        # call: (layer mask, key padding, later_only, packing, the rows found or None)
        self._mask_checked: Optional[tuple] = None
        self._hook = model.register_forward_pre_hook(self._capture_mask, with_kwargs=True)

    # -- mask capture -----------------------------------------------------------------------
    def _capture_mask(self, module, args, kwargs):
        self._cp_answer = None
        self._mask_checked = None
        if self._mode is None:
            return None
        ids = kwargs.get("input_ids", args[0] if args else None)
        self._input_ids = ids if isinstance(ids, Tensor) and ids.dim() == 2 else None
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1 and isinstance(args[1], Tensor):
            mask = args[1]
        if mask is not None and not (isinstance(mask, Tensor) and mask.dim() == 2):
            shape = f"shape {tuple(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(f"attention_mask: the chosen layers mask by a 2-D padding mask or packed sequences "
                             f"only; this model call inside {self._mode} got a custom mask ({shape}) that they "
                             f"would not apply")
        if not self._explicit_mask:
            self._attention_mask = mask
        return None

    def _key_padding(self, key: Tensor) -> Optional[Tensor]:
        mask, source = self._attention_mask, "attention_mask"
        reference = self._state[0] if self._mode == "compare" else None
        if mask is None and reference is not None and reference.key_padding_mask is not None:
            mask, source = reference.key_padding_mask, "reference: its key_padding_mask"
        if mask is None:
            return None
        mask = mask.to(device=key.device, dtype=torch.bool)
        if mask.shape != (key.shape[0], key.shape[2]):
            shard = " (under cp_group: this rank's shard of the mask)" if self.cp_group is not None else ""
            raise ValueError(f"{source}: shape {tuple(mask.shape)} does not match the keys' "
                             f"(B, S) = {(key.shape[0], key.shape[2])}{shard}; record/compare need full-sequence "
                             f"calls without a KV cache, on the batch (or packing) that was recorded")
        if self.cp_group is not None:     # every rank passes its shard to the gather, padded or not
            return mask                   # (_attend_cp checks it against the reference's on every rank)
        if reference is not None and source == "attention_mask":
            mismatch = _padding_mismatch(reference, mask)
            if mismatch is not None:
                raise ValueError(mismatch)
        return None if bool(mask.all()) else mask

    # -- modes --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def record(self, attention_mask: Optional[Tensor] = None) -> Iterator[Recording]:
        """Cache the chosen layers' q, k and stats during the model calls in this block.

        Run it under ``torch.no_grad()`` (the cache is detached anyway). Several model calls
        (batch chunks with the same sequence length, as TRL's old-log-prob loop makes) are
        concatenated along the batch (packed calls: their streams appended). Yields a
        ``Recording``; its ``.reference`` (an ``AttentionReference``) is set on exit. Under
        ``cp_group`` the reference is this rank's shard (q, k, stats, key padding mask over its S_r
        positions): compare with it on the same rank, group and layout; a packed row under
        ``cp_group`` is recorded one call per block (shards of two streams are not a shard of
        their concatenation).
        """
        rec = Recording()
        with self._active("record", rec, attention_mask):
            yield rec
        if len(rec._layers) != len(self.modules):
            raise RuntimeError("record: the chosen layers did not run; call the model inside the block")
        if self.cp_group is not None and len(rec._packings) > 1 and any(p is not None for p in rec._packings):
            raise ValueError("record: under cp_group record one packed call per block (shards of two packed "
                             "streams are not a shard of their concatenation)")
        parts = []
        for c, (mask, packing) in enumerate(zip(rec._masks, rec._packings)):
            layers = [rec._layers[i][c] for i in range(len(self.modules))]
            parts.append(AttentionReference(layers, None if mask is None else mask.to(torch.bool), packing))
        rec.reference = parts[0] if len(parts) == 1 else AttentionReference.cat(parts)
        self._attention_mask = None

    @contextlib.contextmanager
    def compare(self, reference: AttentionReference, row_mask: Optional[Tensor] = None,
                attention_mask: Optional[Tensor] = None, key_segments: Optional[Tensor] = None
                ) -> Iterator[Comparison]:
        """Compute each chosen layer's divergence from ``reference`` during the model call.

        Args:
            reference: recorded on the same token sequences (same B, S, or the same packing; any model).
            row_mask: (B, S) or (B, C) bool, the rows whose divergence counts (response tokens);
                (B, C) is right-aligned to the last C positions. None: every row. Padding tokens are
                no rows. For packed sequences (B, S) is the input ids' shape, (1, T) for one packed row. Under
                ``cp_group``: this rank's shard (B, S_r), and ``.div`` etc. are its rows (B, S_r).
            attention_mask: (B, S) 2-D padding mask; default the one given to the model call,
                else the reference's.
            key_segments: (B, S) integer segment ids of the keys in [0, len(segment_names)), the
                input ids' shape (packed: (1, T)), or None: the ids from the call's input ids
                (VLMs with the default names) or no mass. Given, they turn the statistics on.
        Yields a ``Comparison``: ``.div`` (B, S) float32 differentiable; with statistics also
        ``.entropy`` (B, S) and ``.mass`` (B, S, len(segment_names)), from the same op call.
        """
        if len(reference.layers) != len(self.modules):
            raise ValueError(f"reference: has {len(reference.layers)} layers, the policy chooses "
                             f"{len(self.modules)}")
        cmp = Comparison(segment_names=self.segment_names)
        with self._active("compare", (reference, row_mask, cmp, self._checked_segments(key_segments)),
                          attention_mask):
            self._prefetched = self._prefetch_reference_keys(reference) if self.cp_group is not None else {}
            try:
                yield cmp
            finally:
                self._prefetched = {}
        self._attention_mask = None

    def _prefetch_reference_keys(self, reference: "AttentionReference") -> Dict[int, GatheredKeys]:
        """Under cp_group: every chosen layer's reference keys (this rank's shard), all-gathered now,
        asynchronously, while the model runs the layers before the chosen one (``prefetch_keys``);
        the chosen layer hands them to the op as its k_ref. The shards' sizes are gathered first and
        checked on every rank alike, so that a bad reference raises on all ranks, not in a collective."""
        dim = 0 if reference.packing is not None else 2
        local = reference.layers[0].k.shape[dim]
        world = dist.get_world_size(self.cp_group)
        device = reference.layers[0].k.device
        sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor([local], dtype=torch.int64, device=device), group=self.cp_group)
        sizes = [int(n) for n in sizes]
        seq_len = sum(sizes)
        want = [sum(length for _, length in c) for c in chunks(seq_len, world, self.cp_layout)]
        if sizes != want:
            raise ValueError(f"reference: the ranks hold {sizes} key positions; shards of a sequence of {seq_len} in "
                             f"layout {self.cp_layout!r} have {want}: compare with the reference each rank recorded")
        return {slot: prefetch_keys(layer.k, dim, seq_len, self.cp_group, self.cp_layout)
                for slot, layer in enumerate(reference.layers)}

    @contextlib.contextmanager
    def observe(self, row_mask: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                key_segments: Optional[Tensor] = None) -> Iterator[Comparison]:
        """The statistics of the current policy alone, during the model call: no reference, no
        divergence. The chosen layers run ``ral.ops.attention_stats`` (packed calls: the varlen op
        against the layer's own detached q, k, whose divergence is dropped: no gradient comes from it).

        Arguments as in ``compare``. Yields a ``Comparison`` with ``.entropy`` (B, S) and ``.mass``
        (B, S, len(segment_names)) (None without segment ids), differentiable; it has no ``.div``.
        """
        cmp = Comparison(segment_names=self.segment_names)
        with self._active("observe", (None, row_mask, cmp, self._checked_segments(key_segments)), attention_mask):
            yield cmp
        self._attention_mask = None

    def _checked_segments(self, key_segments: Optional[Tensor]) -> Optional[Tensor]:
        if key_segments is None:
            return None
        if not isinstance(key_segments, Tensor):
            raise TypeError(f"key_segments must be a torch.Tensor (B, S) of integer segment ids, "
                            f"got {type(key_segments).__name__}")
        if key_segments.dtype.is_floating_point or key_segments.dtype.is_complex or key_segments.dtype == torch.bool:
            raise TypeError(f"key_segments: dtype must be an integer type, got {key_segments.dtype}")
        if key_segments.dim() != 2:
            raise ValueError(f"key_segments must have shape (B, S), got {tuple(key_segments.shape)}")
        if self.segment_names is None:
            raise ValueError("key_segments: the policy has no segment names; create it with "
                             "AttentionPolicy(..., segment_names=(...)) naming ids 0, 1, ...")
        return key_segments

    def _statistics(self, key: Tensor, shape: Optional[Tuple[int, int]] = None) -> Tuple[dict, bool]:
        """({key_segments, num_segments} for the op, True when they are real segment ids), or
        ({}, False) for a call without statistics. Keys (B, Hkv, S, D); segment ids (B, S), or
        ``shape`` when the call's keys are a part of the segments' sequence (a sequence-parallel slice)."""
        if self._mode == "record":
            return {}, False
        segments = self._state[3]
        if not (self._mode == "observe" or self.stats or segments is not None):
            return {}, False
        if segments is None and self._vision_tokens is not None and self._input_ids is not None:
            segments = token_segments(self._input_ids, *self._vision_tokens)
        shape = shape or (key.shape[0], key.shape[2])
        if segments is None:                    # one segment: the op still gives the entropy
            return dict(key_segments=torch.zeros(shape, dtype=torch.int32, device=key.device), num_segments=1), False
        if tuple(segments.shape) != tuple(shape):
            raise ValueError(f"key_segments: shape {tuple(segments.shape)} does not match the keys' (B, S) = {shape}")
        return dict(key_segments=segments.to(key.device), num_segments=len(self.segment_names)), True

    @contextlib.contextmanager
    def _active(self, mode, state, attention_mask):
        if self._mode is not None:
            raise RuntimeError(f"AttentionPolicy is already in {self._mode!r} mode")
        self._mode, self._state = mode, state
        self._explicit_mask = attention_mask is not None
        self._input_ids = None
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
            self._mode, self._state, self._explicit_mask, self._input_ids = None, None, False, None
            self._mask_checked = None
            self._cp_answer = None
            for holder in paused:
                holder.gradient_checkpointing = True

    def remove(self) -> None:
        """Detach from the model (it keeps its "ral" / "ral+X" implementation, which then acts as SDPA / X)."""
        self._hook.remove()
        for module in self.modules:
            module._ral_policies = tuple(h for h in getattr(module, "_ral_policies", ()) if h[0] is not self)

    # -- the chosen layers ----------------------------------------------------------------------
    def _check_layer(self, slot: int, kwargs: dict, longest_keys: int, stream_keys: int) -> None:
        """ValueError when chosen layer ``slot`` attends other than ``attention_kl`` computes: a
        score-changing keyword argument of the attention call (``_SCORE_KWARGS``); a
        ``sliding_window`` shorter than the call's longest key sequence ``longest_keys`` (with no more
        keys than the window, every row sees all its keys and the window changes nothing); or a
        chunked-attention layer (Llama 4) whose chunk is shorter than the call's key positions
        ``stream_keys`` (transformers cuts the chunks at the positions of the whole call, packed
        streams included, so within one chunk nothing is cut)."""
        layer = self.modules[slot].layer_idx
        for name, what in _SCORE_KWARGS.items():
            if kwargs.get(name) is not None:
                raise ValueError(f"layers: decoder layer {layer} applies {what} ({name}=...), which "
                                 f"ral.ops.attention_kl does not compute; choose another layer")
        window = kwargs.get("sliding_window")
        if window is not None and longest_keys > int(window):
            raise ValueError(f"layers: decoder layer {layer} is a sliding-window layer (sliding_window={int(window)}) "
                             f"and this call has sequences of {longest_keys} keys; ral.ops.attention_kl attends "
                             f"every earlier key, so choose a full-attention layer (layers= from "
                             f"{self._full_attention_layers()}) or keep sequences within the window")
        chunk = _attention_chunk(self.modules[slot], self.model)
        if chunk is not None and stream_keys > chunk:
            raise ValueError(f"layers: decoder layer {layer} is a chunked-attention layer (attention_chunk_size="
                             f"{chunk}: each query sees the keys of its own chunk) and this call has {stream_keys} "
                             f"key positions; ral.ops.attention_kl attends every earlier key, so choose a "
                             f"full-attention layer (layers= from {self._full_attention_layers()}) or keep calls "
                             f"within one chunk")

    def _noncausal_rows(self, layer_mask, kpm: Optional[Tensor], q_len: int, k_len: int,
                        later_only: bool = False, packing: Optional[Packing] = None,
                        batch: int = 1) -> Optional[Tensor]:
        """The real query rows (B, Sq) bool at which the mask transformers built for a chosen layer
        (4-D: (B | 1, heads | 1, Sq, Sk), bool or additive) is not causal attention over the key
        padding ``kpm``: e.g. Gemma 3's bidirectional image blocks (``token_type_ids``), a prefix-LM, a
        bias in an additive mask; None where there are none (or no 4-D mask). Rows whose query is
        padding are not compared; ``later_only``: only rows that attend a later key. A packed call of
        ``batch`` rows (``packing``): causal within each sequence, the keys of other sequences not
        compared. One pass per mask tensor (chosen layers sharing it are checked once), in blocks of
        rows (no second Sq x Sk tensor), one device sync."""
        if not isinstance(layer_mask, Tensor) or layer_mask.dim() != 4:
            return None
        seen = self._mask_checked
        if seen is not None and seen[0] is layer_mask and seen[1] is kpm and seen[2] == later_only \
                and seen[3] is packing:
            return seen[4]                          # the same mask as the previous chosen layer's
        places = None
        if packing is not None:
            places = packed_places(packing, batch, q_len, k_len, layer_mask.device)
        else:
            batch = layer_mask.shape[0] if kpm is None else kpm.shape[0]
        step = max(1, (1 << 22) // max(1, batch * k_len))
        starts = range(0, q_len, step)
        windows = [None] * len(starts) if packing is None else key_windows(packing, batch, q_len, k_len, step)
        rows = torch.cat([_mask_block_disagrees(layer_mask, kpm, start, step, k_len - q_len, later_only, places, keys)
                          .any(-1).any(1).expand(batch, -1) for start, keys in zip(starts, windows)], dim=1)
        found = rows if bool(rows.any()) else None
        self._mask_checked = (layer_mask, kpm, later_only, packing, found)
        return found

    def _check_policy_rows(self, slot: int, noncausal: Tensor, rows: Optional[Tensor], packed: bool = False) -> None:
        """ValueError when a row the policy is read at (``rows`` (B, Sq) bool; None: every row) is one
        where the layer's mask is not causal: the op's policy there is not the model's attention."""
        used = noncausal if rows is None else noncausal & rows.to(noncausal.device)
        if bool(used.any()):
            b, i = (int(x) for x in used.nonzero()[0])
            raise ValueError(
                f"row_mask: the mask transformers built for decoder layer {self.modules[slot].layer_idx} is not "
                f"causal attention {'within each packed sequence' if packed else 'over the padding'} at "
                f"{int(noncausal.sum())} query rows (e.g. bidirectional image "
                f"blocks from token_type_ids, Gemma 3), and the policy is read at one of them (batch row {b}, "
                f"query {i}); ral.ops.attention_kl's policy is causal, so keep row_mask to the rows after them "
                f"(the response tokens){' (row_mask=None reads every row)' if rows is None else ''}")

    def _full_attention_layers(self) -> List[int]:
        """``layers`` indices of the softmax-attention layers with neither a sliding window nor chunks."""
        return [i for i, m in enumerate(self._attention_modules)
                if getattr(m, "sliding_window", None) is None and _attention_chunk(m, self.model) is None]

    def _attend(self, slot: int, module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                scaling: Optional[float], kwargs: dict, layer_mask=None):
        if query.shape[2] != key.shape[2]:
            raise ValueError(f"{self._mode}: the chosen layers take full-sequence passes; this model call has "
                             f"{query.shape[2]} queries over {key.shape[2]} keys (a KV cache: incremental decoding, "
                             f"generate). Generate outside the block, then call the model on the whole sequences")
        if self._layer_override is not None:
            return self._layer_override(slot, module, query, key, value, scaling, kwargs)
        scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
        if query.dtype != value.dtype or key.dtype != value.dtype:
            # under autocast, rotary embeddings leave q/k in fp32 while v is bf16/fp16: compute in
            # v's dtype, as SDPA does under autocast
            query, key = query.to(value.dtype), key.to(value.dtype)
        kpm = self._key_padding(key)
        opts = dict(divergence=self.divergence, heads=self.heads, exclude_self=self.exclude_self,
                    causal=True, backend=self.backend)
        if self.cp_group is not None:
            return self._attend_cp(slot, query, key, value, scale, kpm, kwargs, opts, layer_mask)
        packing = packed_sequences(kwargs, query.shape[0], query.shape[2], key.shape[2], padded=kpm is not None)
        reference = self._state[0] if self._mode == "compare" else None
        if packing is None and reference is not None and reference.packing is not None \
                and query.shape[0] == 1 and kpm is None:
            packing = one_sequence(query.shape[2], query.device)   # a packed batch of one sequence
        self._check_layer(slot, kwargs, key.shape[2] if packing is None else packing.max_seqlen_k, key.shape[2])
        if packing is not None:
            noncausal = self._noncausal_rows(layer_mask, None, query.shape[2], key.shape[2], packing=packing,
                                             batch=query.shape[0])
            out = self._attend_packed(slot, module, query, key, value, scale, packing, opts, noncausal)
            out = out.transpose(1, 2)                            # (B, H, S, Dv), as the dense path's
        else:
            noncausal = self._noncausal_rows(layer_mask, kpm, query.shape[2], key.shape[2])
            out = self._attend_dense(slot, module, query, key, value, scale, kpm, opts, noncausal)
        if noncausal is not None:
            out = _with_model_rows(out, noncausal, module, query, key, value, layer_mask, scale, packing)
        return out.transpose(1, 2).contiguous(), None

    def _attend_dense(self, slot: int, module: nn.Module, query: Tensor, key: Tensor, value: Tensor, scale: float,
                      kpm: Optional[Tensor], opts: dict, noncausal: Optional[Tensor]) -> Tensor:
        """The chosen layer on a padded batch: the op in this block's mode -> out (B, H, Sq, Dv). Rows in
        ``noncausal`` (B, Sq) are the caller's to replace; the policy must not be read there."""
        reference = self._state[0] if self._mode == "compare" else None
        if self._mode == "record":
            q_ref, k_ref = query.detach(), key.detach()
            if self.record_stats:
                res = ops.attention_kl(q_ref, k_ref, value.detach(), q_ref=q_ref, k_ref=k_ref, scale=scale,
                                       ref_scale=scale, key_padding_mask=kpm, **opts)
                out, stats = res.out, res.stats
            else:
                out = _sdpa_plain(module, query, key, value, kpm, scale)
                stats = None
            self._recorded(slot, LayerReference(q_ref, k_ref, stats, scale), kpm, None)
            return out
        _, row_mask, cmp, _ = self._state
        statistics, has_mass = self._statistics(key)
        rows = _row_mask_full(row_mask, query.shape[2], kpm)
        if noncausal is not None:
            self._check_policy_rows(slot, noncausal, rows)
        if self._mode == "observe":
            opts.pop("divergence")
            res = ops.attention_stats(query, key, value, scale=scale, key_padding_mask=kpm, row_mask=rows,
                                      **statistics, **opts)
            cmp._add(self.layers[slot], None, res.entropy, res.mass if has_mass else None)
            return res.out
        if reference.packing is not None:
            raise ValueError("reference: recorded on packed sequences, the model call is a padded batch; "
                             "compare on the same packed call")
        ref = reference.layers[slot]
        if ref.q.shape[0] != query.shape[0] or ref.q.shape[2] != query.shape[2]:
            raise ValueError(f"reference: recorded (B, S) = {(ref.q.shape[0], ref.q.shape[2])}, the model "
                             f"call has {(query.shape[0], query.shape[2])}")
        res = ops.attention_kl(query, key, value, q_ref=ref.q, k_ref=ref.k, ref_stats=ref.stats, scale=scale,
                               ref_scale=ref.scale, key_padding_mask=kpm, row_mask=rows, **statistics, **opts)
        cmp._add(self.layers[slot], res.div, res.entropy, res.mass if has_mass else None)
        return res.out

    def _attend_packed(self, slot: int, module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                       scale: float, packing: Packing, opts: dict, noncausal: Optional[Tensor]) -> Tensor:
        """The chosen layer on packed sequences: ``ops.attention_kl_varlen`` over the flattened call ->
        out (B, S, H, Dv). Rows in ``noncausal`` (B, S) are the caller's to replace; the policy must
        not be read there."""
        batch, seq = query.shape[0], query.shape[2]
        varlen = dict(cu_seqlens_q=packing.cu_seqlens_q, cu_seqlens_k=packing.cu_seqlens_k,
                      max_seqlen_q=packing.max_seqlen_q, max_seqlen_k=packing.max_seqlen_k, **opts)
        q, k, v = flat_tokens(query), flat_tokens(key), flat_tokens(value)          # (T, heads, dim)
        if self._mode == "record":
            q_ref, k_ref = q.detach(), k.detach()
            if self.record_stats:
                res = ops.attention_kl_varlen(q_ref, k_ref, v.detach(), q_ref=q_ref, k_ref=k_ref, scale=scale,
                                              ref_scale=scale, **varlen)
                out, stats = res.out.reshape(batch, seq, *res.out.shape[1:]).contiguous(), res.stats
            else:
                out, _ = sdpa_packed(module, query, key, value, packing, scale, 0.0)
                stats = None
            self._recorded(slot, LayerReference(q_ref, k_ref, stats, scale), None, packing)
            return out
        reference, row_mask, cmp, _ = self._state
        rows = _row_mask_full(row_mask, seq)
        if noncausal is not None:
            self._check_policy_rows(slot, noncausal, rows, packed=True)
        statistics, has_mass = self._statistics(key)
        if statistics:
            statistics["key_segments"] = statistics["key_segments"].reshape(-1)
        if self._mode == "observe":       # no reference: the layer's own q, k stand in (div 0, no gradient)
            ref = LayerReference(q.detach(), k.detach(), None, scale)
        else:
            if reference.packing is None:
                raise ValueError("reference: recorded on a padded batch, the model call packs sequences; "
                                 "compare on the same padded batch")
            if not reference.packing.same_as(packing):
                raise ValueError(f"reference: recorded with cu_seqlens {reference.packing.cu_seqlens_q.tolist()}, "
                                 f"the model call packs {packing.cu_seqlens_q.tolist()}")
            ref = reference.layers[slot]
        res = ops.attention_kl_varlen(q, k, v, q_ref=ref.q, k_ref=ref.k, ref_stats=ref.stats, scale=scale,
                                      ref_scale=ref.scale, row_mask=None if rows is None else rows.reshape(-1),
                                      **statistics, **varlen)
        each = self.heads == "each"
        cmp._add(self.layers[slot], None if self._mode == "observe" else _unpack_rows(res.div, batch, seq, each),
                 _unpack_rows(res.entropy, batch, seq, each),
                 _unpack_rows(res.mass, batch, seq, each) if has_mass else None)
        return res.out.reshape(batch, seq, *res.out.shape[1:]).contiguous()

    def _attend_cp(self, slot: int, query: Tensor, key: Tensor, value: Tensor, scale: float,
                   kpm: Optional[Tensor], kwargs: dict, opts: dict, layer_mask=None):
        """The chosen layer on this rank's shard of the sequence (cp_group): ``attention_kl_cp`` on the
        local rows with all heads, keys gathered over the group (a packed row: ``attention_kl_cp_varlen``).
        Record keeps this rank's shard of q, k and stats; compare / observe give the local rows'
        div / statistics. The model's local mask (``layer_mask``, built over the shard's own positions)
        is read for one thing: whether a row attends to a later token of the shard (a shard keeps its
        tokens' order); if so (Gemma 3's image blocks), every rank refuses the call."""
        batch, local = query.shape[0], query.shape[2]
        reference, row_mask, cmp, _ = self._state if self._mode != "record" else (None, None, None, None)
        error = None
        if row_mask is not None and tuple(row_mask.shape) != (batch, local):
            error = (f"row_mask: under cp_group it is this rank's shard (B, S_r) = {(batch, local)} "
                     f"(ral.distributed.shard(row_mask, 1, cp_group, cp_layout)), got {tuple(row_mask.shape)}")
        if error is None and reference is not None and kpm is not None:
            error = _padding_mismatch(reference, kpm)
        if error is None and self._noncausal_rows(layer_mask, kpm, local, local, later_only=True) is not None:
            error = (f"attention_mask: under cp_group the mask transformers built for decoder layer "
                     f"{self.modules[slot].layer_idx} lets rows of a shard attend to later keys (e.g. Gemma 3's "
                     f"bidirectional image blocks from token_type_ids); context parallelism "
                     f"computes causal attention only: call the model without the bidirectional part, or "
                     f"without cp_group")
        seq_len, packing = self._cp_layout(kwargs, batch, local, key.device, kpm, error)
        self._check_layer(slot, kwargs, seq_len if packing is None else packing.max_seqlen_k, seq_len)
        rows = _row_mask_full(row_mask, local, kpm)
        statistics, has_mass = self._statistics(key)
        cp = dict(group=self.cp_group, layout=self.cp_layout, **opts)
        if packing is None:
            cp.update(seq_len=seq_len, key_padding_mask=kpm)
            q, k, v = query, key, value
            op = attention_kl_cp
        else:                              # one packed row: (T_r, heads, dim) of the whole stream's shard
            kpm = None                     # a mask without padding, if any: the packing masks per sequence
            cp.update(cu_seqlens=packing.cu_seqlens_q, max_seqlen=packing.max_seqlen_q)
            q, k, v = flat_tokens(query), flat_tokens(key), flat_tokens(value)
            rows = None if rows is None else rows.reshape(-1)
            if statistics:
                statistics["key_segments"] = statistics["key_segments"].reshape(-1)
            op = attention_kl_cp_varlen
        if self._mode == "record":
            q_ref, k_ref = q.detach(), k.detach()
            res = op(q_ref, k_ref, v.detach(), q_ref=q_ref, k_ref=k_ref, scale=scale, ref_scale=scale, **cp)
            self._recorded(slot, LayerReference(q_ref, k_ref, res.stats if self.record_stats else None, scale),
                           kpm, packing)
            return self._cp_out(res.out, batch, local, packing), None
        if self._mode == "observe":       # no reference: the layer's own q, k stand in (div dropped, no gradient)
            ref = LayerReference(q.detach(), k.detach(), None, scale)
        else:
            ref = reference.layers[slot]
            _check_cp_reference(reference, ref, packing, batch, local)
        k_ref = self._prefetched.get(slot, ref.k) if self._mode == "compare" else ref.k
        res = op(q, k, v, q_ref=ref.q, k_ref=k_ref, ref_stats=ref.stats, scale=scale, ref_scale=ref.scale,
                 row_mask=rows, **statistics, **cp)
        results = (None if self._mode == "observe" else res.div, res.entropy, res.mass if has_mass else None)
        if packing is not None:
            results = tuple(_unpack_rows(t, batch, local, self.heads == "each") for t in results)
        cmp._add(self.layers[slot], *results)
        return self._cp_out(res.out, batch, local, packing), None

    @staticmethod
    def _cp_out(out: Tensor, batch: int, local: int, packing: Optional[Packing]) -> Tensor:
        """The op's out, (B, H, S_r, Dv) or packed (T_r, H, Dv), as transformers wants it: (B, S_r, H, Dv)."""
        if packing is None:
            return out.transpose(1, 2).contiguous()
        return out.reshape(batch, local, *out.shape[1:]).contiguous()

    def _cp_layout(self, kwargs: dict, batch: int, local: int, device, kpm: Optional[Tensor],
                   error: Optional[str] = None) -> Tuple[int, Optional[Packing]]:
        """_cp_call's answer, asked of the group once per model call: the chosen layers after the first
        see the same position ids and mask (the model's forward pre-hook clears it)."""
        position_ids = kwargs.get("position_ids")
        seen = self._cp_answer
        if (error is None and seen is not None and seen[0] is position_ids
                and seen[1:4] == (batch, local, kpm is not None)):
            return seen[4]
        answer = self._cp_call(kwargs, batch, local, device, kpm, error)
        self._cp_answer = (position_ids, batch, local, kpm is not None, answer)
        return answer

    def _cp_call(self, kwargs: dict, batch: int, local: int, device, kpm: Optional[Tensor],
                 error: Optional[str] = None) -> Tuple[int, Optional[Packing]]:
        """(S, the whole stream's packing or None) of a call on this rank's shard; `error`: this rank's
        own reason to refuse the call, raised on every rank.

        S is the sum of the ranks' S_r. The 2-D position ids are gathered over the group (every rank
        then sees the same whole sequence's positions and raises the same errors, none is left
        waiting in a collective): the shard's global positions 0 .. S-1 (or, with padding in the 2-D
        mask `kpm` of some rank, any other than each rank's own 0 .. S_r - 1) make a padded batch;
        without padding, position ids that restart make one packed row (B = 1), as in
        ``packed_sequences``."""
        world = dist.get_world_size(self.cp_group)
        position_ids = kwargs.get("position_ids")
        if not (isinstance(position_ids, Tensor) and position_ids.dim() == 2 and position_ids.shape[-1] == local
                and position_ids.shape[0] in (1, batch)):
            position_ids = None
        has_cu = kwargs.get("cu_seq_lens_q") is not None or kwargs.get("cu_seq_lens_k") is not None
        mine = [batch, local, 0 if position_ids is None else position_ids.shape[0], int(has_cu), int(kpm is not None),
                int(error is not None), int(kpm is not None and not bool(kpm.all()))]
        sizes = [torch.zeros(len(mine), dtype=torch.int64, device=device) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor(mine, dtype=torch.int64, device=device), group=self.cp_group)
        sizes = [s.tolist() for s in sizes]
        seq_len = sum(s[1] for s in sizes)
        layout_chunks = chunks(seq_len, world, self.cp_layout)
        want = [sum(length for _, length in c) for c in layout_chunks]
        if any(s[5] for s in sizes):
            raise ValueError(error or f"cp_group: ranks {[r for r, s in enumerate(sizes) if s[5]]} refused the call "
                                      f"(see their error)")
        if any(s[3] for s in sizes):
            raise ValueError("cu_seq_lens_q: flash-attention packing kwargs are not supported with cp_group; pass "
                             "the packed row's position ids (sharded like input_ids) instead")
        if any(s[0] != batch for s in sizes) or [s[1] for s in sizes] != want:
            raise ValueError(f"cp_group: the ranks' shards have (B, S_r) = {[tuple(s[:2]) for s in sizes]}; a "
                             f"sequence of {seq_len} in layout {self.cp_layout!r} has {want} positions per rank with "
                             f"the same B: shard every input with ral.distributed.shard(x, 1, cp_group, "
                             f"{self.cp_layout!r})")
        if any(s[4] != sizes[0][4] for s in sizes):
            raise ValueError("attention_mask: under cp_group give every rank its shard of the 2-D mask, or none")
        if sizes[0][2] == 0 or any(s[2] != sizes[0][2] for s in sizes):
            return seq_len, None           # no 2-D position ids on every rank (M-RoPE): the caller's business
        whole = unshard(position_ids.to(device=device, dtype=torch.int64), 1, seq_len, self.cp_group, self.cp_layout)
        glob = torch.arange(seq_len, device=device)
        if bool((whole == glob).all()):
            return seq_len, None
        if bool((whole == _own_positions(layout_chunks, seq_len, device)).all()):
            raise ValueError("position_ids: under cp_group the call's position ids are each rank's own 0 .. S_r - 1; "
                             "pass the shard's global positions, ral.distributed.shard(torch.arange(S)[None], 1, "
                             "cp_group, cp_layout) (a packing that restarts exactly at the shards is refused as "
                             "ambiguous)")
        if any(s[6] for s in sizes):       # padding somewhere: a padded batch, whatever the position ids
            return seq_len, None
        packing = packing_from_positions(whole, whole.shape[0])
        if packing is not None and batch != 1:
            raise ValueError(f"position_ids: packed sequences under cp_group need one packed row (B = 1), "
                             f"got B = {batch}")
        return seq_len, packing

    def _recorded(self, slot: int, layer: LayerReference, kpm: Optional[Tensor], packing: Optional[Packing]):
        self._state._layers.setdefault(slot, []).append(layer)
        if slot == 0:
            self._state._masks.append(kpm)
            self._state._packings.append(packing)


def _check_cp(cp_group, cp_layout: str) -> None:
    check_choice("cp_layout", cp_layout, LAYOUTS)
    if cp_group is None:
        return
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("cp_group: context parallelism needs an initialised torch.distributed process group "
                         "(torch.distributed.init_process_group), or cp_group=None")
    if dist.get_rank(cp_group) < 0:
        raise ValueError("cp_group: this process is not a member of the given process group")


def _own_positions(layout_chunks, seq_len: int, device) -> Tensor:
    """(S,) the positions every rank would have without global position ids (its own 0 .. S_r - 1),
    placed at its chunks' places in the whole sequence."""
    whole = torch.empty(seq_len, dtype=torch.int64, device=device)
    for rank_chunks in layout_chunks:
        offset = 0
        for start, length in rank_chunks:
            whole[start:start + length] = torch.arange(offset, offset + length, device=device)
            offset += length
    return whole


def _check_cp_reference(reference: "AttentionReference", layer: "LayerReference", packing: Optional[Packing],
                        batch: int, local: int) -> None:
    """A reference recorded under cp_group on this rank's shard of the same (padded or packed) call."""
    if (reference.packing is None) != (packing is None):
        raise ValueError(f"reference: recorded on {'a padded batch' if reference.packing is None else 'a packed row'}"
                         f", the model call is {'a padded batch' if packing is None else 'a packed row'}; "
                         f"compare on the same call")
    if packing is not None:
        if not reference.packing.same_as(packing):
            raise ValueError(f"reference: recorded with cu_seqlens {reference.packing.cu_seqlens_q.tolist()}, the "
                             f"model call packs {packing.cu_seqlens_q.tolist()}")
        if layer.q.shape[0] != local:
            raise ValueError(f"reference: holds {layer.q.shape[0]} tokens, this rank's shard of the packed row has "
                             f"{local}; under cp_group a reference is the recording rank's shard")
    elif layer.q.shape[0] != batch or layer.q.shape[2] != local:
        raise ValueError(f"reference: recorded (B, S_r) = {(layer.q.shape[0], layer.q.shape[2])}, this rank's "
                         f"shard of the model call has {(batch, local)}; under cp_group a reference is "
                         f"the recording rank's shard, compare on the same rank and layout")


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
