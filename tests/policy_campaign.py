#!/usr/bin/env python
"""Random ``AttentionPolicy`` calls against eager attention maps, for as long as asked: a bug hunt over
the integration's options, beside the suite's fixed cases (tests/test_transformers_integration.py).

    python tests/policy_campaign.py --seeds 300                 # ~50 ms a seed on this 2-core host
    python tests/policy_campaign.py --first-seed 5000 --seconds 600

Each seed draws a tiny random Qwen2 (1-3 layers, MHA / GQA / MQA), chosen layers (a subset, positive
or negative indices), divergence, heads, exclude_self, stats, record_stats, key segments, backend
("reference" in float64, "cpu" in float32), a reference model (the same weights perturbed, or one
with other heads), and a call: a batch with left / right padding, one without, or one packed row
(position ids that restart, or the flash-attention ``cu_seq_lens_*`` kwargs), with a row mask
(B, S) or a right-aligned completion mask (B, C). One seed in four runs under a ``cp_group`` of
this process alone (``--no-cp``: none); one padded / plain batch in five runs a tiny Gemma 3 VLM
instead, with an image (bidirectional in transformers' mask) in each sequence that has room and
its rows left out of the row mask. ``record`` on the reference model, then ``compare`` on the
policy model (one seed in five: ``observe``, the statistics alone). The peer is transformers'
eager attention of each sequence run alone (padding stripped, positions kept): its maps give div,
entropy and mass per row (the paper's policy, from the probabilities), its logits the logits, and,
one seed in two, the weights' gradients of a random linear function of logits and div.
Tolerances: 1e-6 in float64 (eager rounds its softmax to float32), 2e-4 in float32; gradients
1e-5 / 2e-3 of the model's largest. A failing seed is printed with its draw, so one line
reproduces it: ``python tests/policy_campaign.py --first-seed S --seeds 1``.
"""

from __future__ import annotations

import argparse
import copy
import random
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import transformers

from ral.integrations.transformers import AttentionPolicy

VOCAB = 64
IMAGE = 260                  # the Gemma 3 VLM's image token


def _model(rng: random.Random, heads: int, kv_heads: int, layers: int, dtype: torch.dtype):
    cfg = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=8 * heads, intermediate_size=32,
                                   num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                                   max_position_embeddings=128)
    torch.manual_seed(rng.randrange(10 ** 6))
    model = transformers.Qwen2ForCausalLM(cfg).to(dtype).eval()
    model.set_attn_implementation("sdpa")
    return model


def tiny_gemma3_vlm(dtype: torch.dtype):
    """A tiny Gemma 3 VLM on "sdpa" from the current torch seed: SigLIP 28 x 28 images (2 x 2 patches ->
    4 image tokens, id 260; boi 261, eoi 262), two text layers (the suite's too)."""
    text = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, max_position_embeddings=128, sliding_window=512)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    cfg = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                    image_token_id=IMAGE, boi_token_id=IMAGE + 1, eoi_token_id=IMAGE + 2)
    model = transformers.Gemma3ForConditionalGeneration(cfg).to(dtype).eval()
    model.set_attn_implementation("sdpa")
    return model


def _map_terms(new, old, keep, divergence: str, heads: str, segments):
    """div, entropy and mass (or None) per row from eager maps (1, H, S, S) of the policy and the
    reference and the support ``keep`` (1, S, S): the contract's math on probabilities."""
    if heads == "mean":
        new, old = new.mean(1), old.mean(1)
    else:
        keep = keep[:, None]

    def policy(a):
        a = torch.where(keep, a, torch.zeros((), dtype=a.dtype))
        return a / a.sum(-1, keepdim=True).clamp_min(1e-300)

    pi, rho = policy(new), policy(old)
    log_pi, log_rho = torch.log(pi.clamp_min(1e-300)), torch.log(rho.clamp_min(1e-300))
    if divergence == "kl":
        terms = pi * (log_pi - log_rho)
    elif divergence == "reverse_kl":
        terms = rho * (log_rho - log_pi)
    else:
        log_mid = torch.log((0.5 * (pi + rho)).clamp_min(1e-300))
        terms = 0.5 * pi * (log_pi - log_mid) + 0.5 * rho * (log_rho - log_mid)
    zero = torch.zeros((), dtype=pi.dtype)
    div = torch.where(keep, terms, zero).sum(-1)
    entropy = -torch.where(keep, pi * log_pi, zero).sum(-1)
    mass = None
    if segments is not None:
        one_hot = torch.nn.functional.one_hot(segments, 3).to(pi.dtype)          # (1, S, 3)
        mass = pi @ (one_hot if pi.dim() == 3 else one_hot[:, None])
    return div, entropy, mass


def draw_and_check(seed: int, cp_group=None):
    """One seed: (its draw, {quantity: error}, {quantity: error} over the tolerance). With
    ``cp_group`` (a group of this process alone), one seed in four (not packed by cu_seq_lens, which
    context parallelism refuses) runs the policy under it, position ids given, the full row mask."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    heads, kv_heads = rng.choice([(4, 2), (4, 4), (4, 1), (2, 1)])
    n_layers = rng.choice([1, 2, 3])
    backend = rng.choice(["reference", "cpu"])
    dtype = torch.float64 if backend == "reference" else torch.float32
    model = _model(rng, heads, kv_heads, n_layers, dtype)
    layers = tuple(sorted(rng.sample(range(n_layers), rng.randint(1, n_layers))))
    if rng.random() < 0.3:
        layers = tuple(layer - n_layers for layer in layers)
    draw = dict(seed=seed, heads=heads, kv_heads=kv_heads, n_layers=n_layers, layers=layers,
                divergence=rng.choice(["jsd", "kl", "reverse_kl"]), heads_mode=rng.choice(["mean", "each"]),
                exclude_self=rng.random() < 0.7, stats=rng.random() < 0.5, backend=backend,
                layout=rng.choice(["padded", "packed-positions", "packed-cu", "plain"]),
                record_stats=rng.random() < 0.7)
    draw.update(other_reference=draw["heads_mode"] == "mean" and rng.random() < 0.3, segments=rng.random() < 0.4,
                gradients=rng.random() < 0.5, completion_mask=rng.random() < 0.3, observe=rng.random() < 0.2)
    each = draw["heads_mode"] == "each"
    draw["cp"] = (cp_group is not None and draw["layout"] != "packed-cu"
                  and random.Random(seed * 7 + 1).random() < 0.25)        # its own stream: the rest is unchanged
    # one seed in five of the padded / plain batches (not under cp, which refuses image blocks; not
    # packed: transformers 5.25 misplaces the image blocks of a packed row's later sequences, so its own
    # packed call is not the sequences run alone): a Gemma 3 VLM whose images attend both ways
    vlm_stream = random.Random(seed * 7 + 2)
    draw["gemma3_vlm"] = (not draw["cp"] and draw["layout"] in ("padded", "plain") and vlm_stream.random() < 0.2
                          and hasattr(transformers, "Gemma3ForConditionalGeneration"))
    if draw["gemma3_vlm"]:
        torch.manual_seed(vlm_stream.randrange(10 ** 6))
        model, heads, n_layers = tiny_gemma3_vlm(dtype), 4, 2
        layers = (vlm_stream.choice([0, 1, -1, -2]),) if vlm_stream.random() < 0.7 else (0, 1)
        draw.update(heads=4, kv_heads=2, n_layers=2, layers=layers, other_reference=False)
    if draw["other_reference"]:
        reference_model = _model(rng, *rng.choice([(2, 1), (4, 2), (8, 2)]), n_layers, dtype)
    else:
        reference_model = copy.deepcopy(model)
        with torch.no_grad():
            for p in reference_model.parameters():
                p.add_(torch.randn(p.shape, generator=gen).to(dtype) * 0.1)

    # the call, and where each sequence's tokens sit in it: (batch row, positions)
    if draw["layout"] in ("padded", "plain"):
        batch, seq = rng.randint(1, 3), rng.randint(9 if draw["gemma3_vlm"] else 3, 16)
        ids = torch.randint(0, VOCAB, (batch, seq), generator=gen)
        mask = torch.ones(batch, seq, dtype=torch.long)
        if draw["layout"] == "padded":
            for b in range(batch):
                pad = rng.randint(0, seq - (8 if draw["gemma3_vlm"] else 2))
                if rng.random() < 0.5:
                    mask[b, :pad] = 0
                else:
                    mask[b, seq - pad:] = 0
        call = dict(input_ids=ids, attention_mask=mask)
        pieces = [(b, mask[b].bool().nonzero().flatten()) for b in range(batch)]
        shape = (batch, seq)
    else:
        lengths = [rng.randint(2, 8) for _ in range(rng.randint(2, 4))]
        ids = torch.randint(0, VOCAB, (1, sum(lengths)), generator=gen)
        call = dict(input_ids=ids, position_ids=torch.cat([torch.arange(n) for n in lengths])[None], use_cache=False)
        cu = [0] + torch.tensor(lengths).cumsum(0).tolist()
        if draw["layout"] == "packed-cu":
            cu_seqlens = torch.tensor(cu, dtype=torch.int32)
            call.update(cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens, max_length_q=max(lengths),
                        max_length_k=max(lengths))
        pieces = [(0, torch.arange(a, b)) for a, b in zip(cu[:-1], cu[1:])]
        shape = (1, sum(lengths))
    vocab = model.config.get_text_config().vocab_size
    extra = {}                                        # per piece: its pixels and token types (Gemma 3)
    if draw["gemma3_vlm"]:
        pixels = []
        for b, where in pieces:
            if len(where) >= 7:                       # room for <boi> 4 x <image> <eoi> and a token after
                at = where[vlm_stream.randrange(len(where) - 6)]
                ids[b, at:at + 6] = torch.tensor([IMAGE + 1] + [IMAGE] * 4 + [IMAGE + 2])
                pixels.append(torch.randn(1, 3, 28, 28, generator=gen).to(dtype))
                extra[(b, int(where[0]))] = pixels[-1]
        call["token_type_ids"] = (ids == IMAGE).long()
        draw["images"] = len(pixels)
        if pixels:
            call["pixel_values"] = torch.cat(pixels)
    if draw["cp"] and "position_ids" not in call:
        call["position_ids"] = torch.arange(shape[1])[None].expand(shape[0], -1)
    real = call.get("attention_mask", torch.ones(shape, dtype=torch.long)).bool()
    rows = torch.rand(shape, generator=gen) < 0.7
    if draw["gemma3_vlm"]:
        rows &= ids != IMAGE                          # the image rows' policy is not the model's attention
    row_mask = rows
    if draw["completion_mask"] and not draw["cp"]:   # a right-aligned (B, C) completion mask
        width = rng.randint(1, shape[1])
        row_mask = rows[:, shape[1] - width:]
        rows = torch.zeros(shape, dtype=torch.bool)
        rows[:, shape[1] - width:] = row_mask
    segments = torch.randint(0, 3, shape, generator=gen) if draw["segments"] else None

    # the peer: eager maps of each sequence alone (padding stripped, positions kept)
    eager, eager_ref = copy.deepcopy(model), copy.deepcopy(reference_model)
    for m in (eager, eager_ref):
        m.set_attn_implementation("eager")
    chosen = [layer % n_layers for layer in layers]
    row_shape = (shape[0], heads, shape[1]) if each else shape
    want_div, want_entropy = (torch.zeros(row_shape, dtype=torch.float64) for _ in range(2))
    want_mass = torch.zeros(row_shape + (3,), dtype=torch.float64)
    want_logits = torch.zeros(shape + (vocab,), dtype=torch.float64)
    with torch.set_grad_enabled(draw["gradients"]):
        for b, where in pieces:
            positions = where if draw["layout"] in ("padded", "plain") else torch.arange(len(where))
            piece = dict(input_ids=ids[b:b + 1, where], position_ids=positions[None], output_attentions=True)
            if draw["gemma3_vlm"]:
                piece["token_type_ids"] = (piece["input_ids"] == IMAGE).long()
                if (b, int(where[0])) in extra:
                    piece["pixel_values"] = extra[(b, int(where[0]))]
            out = eager(**piece)
            with torch.no_grad():
                out_ref = eager_ref(**piece)
            keep = torch.ones(len(where), len(where), dtype=torch.bool).tril(-1 if draw["exclude_self"] else 0)[None]
            terms = [_map_terms(out.attentions[layer].double(), out_ref.attentions[layer].double(), keep,
                                draw["divergence"], draw["heads_mode"],
                                None if segments is None else segments[b:b + 1, where]) for layer in chosen]
            at = (b, slice(None), where) if each else (b, where)
            want_div[at] = sum(t[0][0] for t in terms) / len(chosen)       # the layer mean, as Comparison.div
            want_entropy[at] = sum(t[1][0] for t in terms).detach() / len(chosen)
            if segments is not None:
                want_mass[at] = sum(t[2][0] for t in terms).detach() / len(chosen)
            want_logits[b, where] = out.logits[0].double()
    read = (rows & real)[:, None] if each else rows & real
    want_div, want_entropy = (torch.where(read, t, torch.zeros((), dtype=t.dtype)) for t in (want_div, want_entropy))
    want_mass = torch.where(read[..., None], want_mass, torch.zeros((), dtype=torch.float64))

    # ral: record on the reference model, compare on the model
    options = dict(layers=layers, divergence=draw["divergence"], heads=draw["heads_mode"],
                   exclude_self=draw["exclude_self"], backend=backend,
                   cp_group=cp_group if draw["cp"] else None)
    recorder = AttentionPolicy(reference_model, record_stats=draw["record_stats"], **options)
    policy = AttentionPolicy(model, stats=draw["stats"], **options,
                             **(dict(segment_names=("a", "b", "c")) if segments is not None else {}))
    segment_arg = {} if segments is None else dict(key_segments=segments)
    if draw["observe"]:                              # the statistics alone, no reference
        with torch.no_grad(), policy.observe(row_mask=row_mask, **segment_arg) as cmp:
            logits = model(**call).logits
        draw["gradients"] = False
    else:
        with torch.no_grad(), recorder.record() as rec:
            reference_model(**call)
        with torch.set_grad_enabled(draw["gradients"]), policy.compare(rec.reference, row_mask=row_mask,
                                                                       **segment_arg) as cmp:
            logits = model(**call).logits
    errors = {"logits": float((logits.detach().double() - want_logits.detach())[real].abs().max())}
    if not draw["observe"]:
        errors["div"] = float((cmp.div.detach().double() - want_div.detach()).abs().max())
    if cmp.entropy is not None:
        errors["entropy"] = float((cmp.entropy.detach().double() - want_entropy).abs().max())
    if segments is not None:
        errors["mass"] = float((cmp.mass.detach().double() - want_mass).abs().max())
    if draw["gradients"]:
        w_logits = torch.randn(shape + (vocab,), generator=gen, dtype=torch.float64) * real[..., None]
        w_div = torch.randn(row_shape, generator=gen, dtype=torch.float64)
        ((logits.double() * w_logits).sum() + (cmp.div.double() * w_div).sum()).backward()
        ((want_logits * w_logits).sum() + (want_div * w_div).sum()).backward()
        # relative to the model's largest gradient: some are 0 in exact arithmetic (k_proj's bias
        # shifts a whole row of scores), and the peer's float32 softmax leaves them at ~1e-9
        got = [p.grad if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
        want = [q.grad if q.grad is not None else torch.zeros_like(q) for q in eager.parameters()]
        largest = max(float(w.abs().max()) for w in want) + 1e-12
        errors["gradients (relative)"] = max(float((g - w).abs().max()) for g, w in zip(got, want)) / largest
    tol = 1e-6 if dtype == torch.float64 else 2e-4
    bad = {k: v for k, v in errors.items() if not v <= (10 * tol if k.startswith("gradients") else tol)}
    return draw, errors, bad


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, default=None, help="how many seeds (default: until --seconds)")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--no-cp", action="store_true", help="no seed under a one-rank cp_group")
    args = parser.parse_args(argv)
    cp_group = None
    if not args.no_cp:
        store = tempfile.NamedTemporaryFile(suffix=".store", delete=False).name
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
        cp_group = dist.group.WORLD
    start, seed, failing = time.time(), args.first_seed, 0
    while (seed - args.first_seed < args.seeds) if args.seeds is not None else (time.time() - start < args.seconds):
        try:
            desc, errors, bad = draw_and_check(seed, cp_group)
        except Exception as exc:                                  # a crash is a finding too
            failing += 1
            print(f"ERROR seed {seed}: {type(exc).__name__}: {exc}", flush=True)
        else:
            if bad:
                failing += 1
                print(f"FAIL {desc} " + " ".join(f"{k} {v:.2e}" for k, v in errors.items()), flush=True)
        seed += 1
    print(f"seeds {args.first_seed}..{seed - 1}: {seed - args.first_seed} drawn, {failing} failing")
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
