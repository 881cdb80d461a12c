"""Padding-free (packed) batches through ``AttentionPolicy`` on tiny models built in code.

Three sequences of different lengths run once as a padded batch (left and right padding) and once
packed end to end into one row, in each of the ways transformers tells attention about packing:

* "positions":       position ids restarting at 0, ``use_cache=False`` (transformers builds the
                     block-diagonal mask for the other layers);
* "positions_cache": the same with ``use_cache=True`` (transformers hands SDPA no mask; the "ral"
                     attention function builds it);
* "flash_kwargs":    ``cu_seq_lens_q/k`` + ``max_length_q/k`` from
                     ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``, with its position ids.

For each: record with perturbed ("old") weights, compare with the current ones; the packed call
gives the same logits, the same per-token div (non-zero) and the same parameter gradients as the
padded batch. The VL models get real pixel inputs (two images of different grids, one text-only
sequence) and their M-RoPE positions per sequence from ``get_rope_index``; packed, the text
positions go first in a (4, 1, T) ``position_ids``, the form both models read packing from.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from ral.integrations.transformers import AttentionPolicy, AttentionReference, Packing, packed_sequences  # noqa: E402
from test_transformers_integration import (IMAGE_TOKEN, _param_grads, _perturbed, _qwen2, _qwen3vl,  # noqa: E402
                                           _qwen25vl)

pytestmark = pytest.mark.usefixtures("one_thread")

BACKENDS = ["reference", "cpu"]
HOWS = ["positions", "positions_cache", "flash_kwargs"]
VISION_START, VISION_END = 62, 63


# ----------------------------------------------------------------------------------------------
# Cases: a model, its perturbed copy, three sequences
# ----------------------------------------------------------------------------------------------

BUILDERS = {"qwen2": _qwen2, "qwen25vl": _qwen25vl, "qwen3vl": _qwen3vl}


def _vl(kind):
    return kind != "qwen2"


def _sequences(kind, gen):
    """[(ids (L,), image grid (1, 3) or None)]: lengths 9, 4, 12 (VL: images 4x4 and 4x8 patches)."""
    def text(n):
        return torch.randint(2, 50, (n,), generator=gen)

    def image(h, w):
        return torch.tensor([VISION_START] + [IMAGE_TOKEN] * (h * w // 4) + [VISION_END]), torch.tensor([[1, h, w]])

    if not _vl(kind):
        return [(text(9), None), (text(4), None), (text(12), None)]
    img0, grid0 = image(4, 4)          # 4 merged tokens
    img2, grid2 = image(4, 8)          # 8 merged tokens
    return [(torch.cat([text(2), img0, text(1)]), grid0), (text(4), None),
            (torch.cat([text(1), img2, text(1)]), grid2)]


def _positions(model, kind, ids, grid):
    """Position ids of one sequence alone: (L,) for text models, (3, L) M-RoPE rows for VL models."""
    if not _vl(kind):
        return torch.arange(len(ids))
    pos, _ = model.model.get_rope_index(ids[None], mm_token_type_ids=(ids == IMAGE_TOKEN).int()[None],
                                        image_grid_thw=grid)
    return pos[:, 0]


def _padded(kind, seqs, positions, side):
    """A padded batch (B, S); ``index`` (T,) maps the packed tokens to flattened (B * S) positions."""
    b, s = len(seqs), max(len(ids) for ids, _ in seqs)
    ids = torch.zeros(b, s, dtype=torch.long)
    mask = torch.zeros(b, s, dtype=torch.long)
    pos = torch.zeros((3, b, s) if _vl(kind) else (b, s), dtype=torch.long)
    index = []
    for i, ((seq, _), p) in enumerate(zip(seqs, positions)):
        cols = slice(s - len(seq), s) if side == "left" else slice(0, len(seq))
        ids[i, cols], mask[i, cols] = seq, 1
        pos[..., i, cols] = p
        index.append(torch.arange(s)[cols] + i * s)
    return dict(input_ids=ids, attention_mask=mask, position_ids=pos), torch.cat(index)


def _packed(kind, seqs, positions, how):
    ids = torch.cat([seq for seq, _ in seqs])[None]
    text_pos = torch.cat([torch.arange(len(seq)) for seq, _ in seqs])[None]
    pos = torch.cat([text_pos[None], torch.cat(positions, dim=-1)[:, None]]) if _vl(kind) else text_pos
    inputs = dict(input_ids=ids, position_ids=pos, use_cache=how != "positions")
    if how == "flash_kwargs":
        flat = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True)(
            [{"input_ids": seq.tolist()} for seq, _ in seqs])
        assert torch.equal(flat["input_ids"], ids) and torch.equal(flat["position_ids"], text_pos)
        inputs.update({k: flat[k] for k in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")})
    return inputs, torch.arange(ids.shape[1])


def _vision_inputs(kind, seqs, ids, gen):
    if not _vl(kind):
        return {}
    grids = torch.cat([grid for _, grid in seqs if grid is not None])
    patches = int(grids.prod(-1).sum())
    return dict(pixel_values=torch.randn(patches, 3 * 1 * 2 * 2, generator=gen), image_grid_thw=grids,
                mm_token_type_ids=(ids == IMAGE_TOKEN).int())


def _response_rows(seqs):
    """(T,) bool in packed order: the last 3 tokens of every sequence."""
    return torch.cat([torch.arange(len(seq)) >= len(seq) - 3 for seq, _ in seqs])


def _run(base, old, inputs, index, rows, w_logits, w_div, backend):
    """record (old) + compare (base) + backward; everything gathered into packed token order."""
    base.zero_grad(set_to_none=True)
    shape = inputs["input_ids"].shape
    rows_layout = torch.zeros(shape.numel(), dtype=torch.bool)
    rows_layout[index] = rows
    new_policy, old_policy = AttentionPolicy(base, backend=backend), AttentionPolicy(old, backend=backend)
    try:
        with torch.no_grad(), old_policy.record() as rec:
            old_logits = old(**inputs).logits
        with new_policy.compare(rec.reference, row_mask=rows_layout.view(shape)) as cmp:
            logits = base(**inputs).logits
        div = cmp.div
        assert div.shape == shape and div.dtype == torch.float32
        logits = logits.reshape(-1, logits.shape[-1])[index]
        div = div.reshape(-1)[index]
        ((logits * w_logits).sum() + (div * w_div).sum()).backward()
    finally:
        new_policy.remove()
        old_policy.remove()
    old_logits = old_logits.reshape(-1, old_logits.shape[-1])[index]
    return dict(reference=rec.reference, old_logits=old_logits, logits=logits.detach(), div=div.detach(),
                grads=_param_grads(base))


def _case(kind):
    if kind == "qwen3vl" and not hasattr(transformers, "Qwen3VLForConditionalGeneration"):
        pytest.skip(f"transformers {transformers.__version__} has no Qwen3-VL")
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    base = BUILDERS[kind]().float()
    old = _perturbed(base, gen)
    seqs = _sequences(kind, gen)
    positions = [_positions(base, kind, ids, grid) for ids, grid in seqs]
    return base, old, seqs, positions, gen


def _assert_same(got, want, what):
    torch.testing.assert_close(got["old_logits"], want["old_logits"], atol=2e-5, rtol=1e-4, msg=f"{what}: old logits")
    torch.testing.assert_close(got["logits"], want["logits"], atol=2e-5, rtol=1e-4, msg=f"{what}: logits")
    torch.testing.assert_close(got["div"], want["div"], atol=1e-6, rtol=1e-4, msg=f"{what}: div")
    assert set(got["grads"]) == set(want["grads"]), what
    for name, g in want["grads"].items():
        scale = float(g.abs().max()) + 1e-6
        assert float((got["grads"][name] - g).abs().max()) <= 2e-4 * scale + 1e-6, f"{what}: grad of {name}"


# ----------------------------------------------------------------------------------------------
# Packed == padded
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["qwen2", "qwen25vl", "qwen3vl"])
def test_packed_matches_padded(kind, backend):
    base, old, seqs, positions, gen = _case(kind)
    rows = _response_rows(seqs)
    total = len(rows)
    w_logits = torch.randn(total, base.config.get_text_config().vocab_size, generator=gen)
    w_div = torch.randn(total, generator=gen)
    vision_gen_state = gen.get_state()

    def run(inputs, index):
        gen.set_state(vision_gen_state)                 # the same pixels for every layout
        inputs.update(_vision_inputs(kind, seqs, inputs["input_ids"], gen))
        return _run(base, old, inputs, index, rows, w_logits, w_div, backend)

    want = run(*_padded(kind, seqs, positions, "left"))
    assert float(want["div"].abs().max()) > 1e-4              # the perturbation moved the attention
    assert bool((want["div"][~rows] == 0).all())
    assert want["reference"].packing is None
    _assert_same(run(*_padded(kind, seqs, positions, "right")), want, "right padding")
    for how in HOWS:
        got = run(*_packed(kind, seqs, positions, how))
        ref = got["reference"]
        assert isinstance(ref.packing, Packing) and ref.key_padding_mask is None and len(ref) == 3
        assert ref.packing.cu_seqlens_q.tolist() == torch.tensor([0] + [len(s) for s, _ in seqs]).cumsum(0).tolist()
        assert ref.layers[0].q.shape[0] == total and ref.layers[0].stats.shape[:1] == (total,)
        _assert_same(got, want, how)


def test_other_layers_attend_per_sequence_outside_record_compare():
    """No policy mode active: every "ral" layer runs SDPA; with ``use_cache=True`` or only the
    flash kwargs transformers builds no mask, and the packed call must still match the padded one."""
    base, _, seqs, positions, _ = _case("qwen2")
    AttentionPolicy(base)
    padded, index = _padded("qwen2", seqs, positions, "right")
    with torch.no_grad():
        want = base(**padded).logits.reshape(-1, 64)[index]
        for how in HOWS:
            packed, _ = _packed("qwen2", seqs, positions, how)
            torch.testing.assert_close(base(**packed).logits[0], want, atol=2e-5, rtol=1e-4, msg=how)
        # flash kwargs without position ids: positions run 0..T-1 (as transformers' flash path would
        # rotate them), but attention still stays inside each sequence: the first sequence is unchanged
        packed, _ = _packed("qwen2", seqs, positions, "flash_kwargs")
        del packed["position_ids"]
        got = base(**packed).logits[0]
        torch.testing.assert_close(got[:9], want[:9], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_heads_each_packed(backend):
    base, old, seqs, positions, gen = _case("qwen2")
    rows = _response_rows(seqs)
    results = []
    for inputs, index in (_padded("qwen2", seqs, positions, "left"), _packed("qwen2", seqs, positions, "positions")):
        shape = inputs["input_ids"].shape
        layout_rows = torch.zeros(shape.numel(), dtype=torch.bool)
        layout_rows[index] = rows
        new_policy = AttentionPolicy(base, heads="each", backend=backend)
        old_policy = AttentionPolicy(old, heads="each", backend=backend)
        with torch.no_grad(), old_policy.record() as rec:
            old(**inputs)
        with torch.no_grad(), new_policy.compare(rec.reference, row_mask=layout_rows.view(shape)) as cmp:
            base(**inputs)
        div = cmp.div
        assert div.shape == (shape[0], 4, shape[1])
        results.append(div.permute(0, 2, 1).reshape(-1, 4)[index])
        new_policy.remove()
        old_policy.remove()
    assert float(results[0].abs().max()) > 1e-4
    torch.testing.assert_close(results[1], results[0], atol=1e-6, rtol=1e-4)


# ----------------------------------------------------------------------------------------------
# The packing of a call; packed references
# ----------------------------------------------------------------------------------------------

def test_packed_sequences_from_call_arguments():
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1]])
    p = packed_sequences({"position_ids": pos}, 1, 9, 9)
    assert p.cu_seqlens_q.tolist() == [0, 4, 7, 9] and p.cu_seqlens_q.dtype == torch.int32
    assert (p.max_seqlen_q, p.max_seqlen_k) == (4, 4) and p.cu_seqlens_k.tolist() == [0, 4, 7, 9]
    assert packed_sequences({"position_ids": torch.arange(9)[None]}, 1, 9, 9) is None      # one sequence
    assert packed_sequences({"position_ids": pos}, 1, 9, 9, padded=True) is None            # left padding, not packing
    assert packed_sequences({"position_ids": pos[:, -1:]}, 1, 1, 9) is None                 # decoding
    assert packed_sequences({}, 1, 9, 9) is None
    # two rows, each packing its own sequences: flattened batch-major
    rows = torch.tensor([[0, 1, 2, 0, 1], [0, 1, 2, 3, 4]])
    assert packed_sequences({"position_ids": rows}, 2, 5, 5).cu_seqlens_q.tolist() == [0, 3, 5, 10]
    # the answer is remembered for the same tensor, but not across an in-place change
    pos[0, 4:] = torch.arange(4, 9)
    assert packed_sequences({"position_ids": pos}, 1, 9, 9) is None
    # the flash-attention kwargs
    cu = torch.tensor([0, 3, 5], dtype=torch.int32)
    p = packed_sequences({"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": 3, "max_length_k": 3}, 1, 5, 5)
    assert p.cu_seqlens_q is cu and (p.max_seqlen_q, p.max_seqlen_k) == (3, 3)
    p = packed_sequences({"cu_seq_lens_q": cu.long(), "cu_seq_lens_k": cu.long()}, 1, 5, 5)
    assert p.cu_seqlens_k.dtype == torch.int32 and p.max_seqlen_k == 3
    with pytest.raises(ValueError, match="cu_seq_lens_q"):
        packed_sequences({"cu_seq_lens_q": cu, "cu_seq_lens_k": cu}, 1, 6, 6)               # does not end at T
    with pytest.raises(ValueError, match="cu_seq_lens_q"):
        packed_sequences({"cu_seq_lens_q": cu, "cu_seq_lens_k": cu}, 1, 5, 5, padded=True)
    with pytest.raises(ValueError, match="both"):
        packed_sequences({"cu_seq_lens_q": cu}, 1, 5, 5)


def test_packed_reference_use_and_misuse():
    base, old, seqs, positions, _ = _case("qwen2")
    policy, old_policy = AttentionPolicy(base, backend="reference"), AttentionPolicy(old, backend="reference")
    packed, _ = _packed("qwen2", seqs, positions, "positions")
    padded, _ = _padded("qwen2", seqs, positions, "right")
    with torch.no_grad(), old_policy.record() as whole:
        old(**packed)
    with torch.no_grad(), policy.compare(whole.reference) as want:
        base(**packed)
    # recording in two packed chunks appends the streams
    first, rest = ([s for s in seqs[:2]], positions[:2]), ([seqs[2]], positions[2:])
    with torch.no_grad(), old_policy.record() as parts:
        for chunk_seqs, chunk_pos in (first, rest):
            old(**_packed("qwen2", chunk_seqs, chunk_pos, "positions")[0])
    ref = parts.reference
    assert ref.packing.cu_seqlens_q.tolist() == whole.reference.packing.cu_seqlens_q.tolist()
    assert ref.packing.max_seqlen_q == 12
    torch.testing.assert_close(ref.layers[0].stats, whole.reference.layers[0].stats)
    with torch.no_grad(), policy.compare(ref) as got:
        base(**packed)
    torch.testing.assert_close(got.div, want.div)
    moved = whole.reference.to("cpu", torch.float64)
    assert moved.packing is not None and moved.layers[0].q.dtype == torch.float64
    assert AttentionReference.cat([whole.reference]).packing.cu_seqlens_q.tolist() == [0, 9, 13, 25]

    with torch.no_grad(), old_policy.record() as padded_rec:
        old(**padded)
    with pytest.raises(ValueError, match="reference"):
        with torch.no_grad(), policy.compare(whole.reference):
            base(**padded)
    with pytest.raises(ValueError, match="reference"):
        with torch.no_grad(), policy.compare(padded_rec.reference):
            base(**packed)
    other, _ = _packed("qwen2", seqs[::-1], positions[::-1], "positions")
    with pytest.raises(ValueError, match="cu_seqlens"):
        with torch.no_grad(), policy.compare(whole.reference):
            base(**other)
    with pytest.raises(ValueError, match="packed"):
        whole.reference[0]
    with pytest.raises(ValueError, match="packed"):
        whole.reference.to_dict()
    with pytest.raises(ValueError, match="packed"):
        AttentionReference.cat([whole.reference, padded_rec.reference])
    # a packed micro-batch of one sequence is an ordinary one-row call; it compares against its
    # packed form and appends to packed references
    one, _ = _packed("qwen2", seqs[2:], positions[2:], "positions")
    with torch.no_grad(), old_policy.record() as single:
        old(**one)
    assert single.reference.packing is None
    packed_single = AttentionReference.cat([parts.reference, single.reference]).packing
    assert packed_single.cu_seqlens_q.tolist() == [0, 9, 13, 25, 37]
    with torch.no_grad(), policy.compare(AttentionReference.cat([single.reference])) as direct:
        base(**one)
    with torch.no_grad(), policy.compare(single.reference._as_packed()) as as_packed:
        base(**one)
    torch.testing.assert_close(as_packed.div, direct.div)
    torch.testing.assert_close(as_packed.div[0], want.div[0, 13:], atol=1e-6, rtol=1e-4)
