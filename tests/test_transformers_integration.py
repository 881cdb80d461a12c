"""The "ral" attention implementation against transformers' eager attention on tiny models.

Every model is built from a config (offline). For each: logits with "ral" (record and compare)
match eager; the compare-mode div matches the paper's recipe computed from eager
``output_attentions=True`` weights (last layer, head average, drop self, renormalise, JSD against
the old weights' map); and the parameter gradients of logits + div match eager's.
"""

import copy
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from ral.integrations.transformers import AttentionPolicy, AttentionReference  # noqa: E402

torch.backends.cuda.matmul.allow_tf32 = False


pytestmark = pytest.mark.usefixtures("one_thread")


def _qwen2():
    cfg = transformers.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.Qwen2ForCausalLM(cfg)


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg)


IMAGE_TOKEN = 60


def _qwen25vl():
    cfg = transformers.Qwen2_5_VLConfig(
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}, bos_token_id=0, eos_token_id=1),
        vision_config=dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, patch_size=2,
                           spatial_merge_size=2, temporal_patch_size=1, out_hidden_size=32, window_size=4,
                           fullatt_block_indexes=[1], in_channels=3),
        image_token_id=IMAGE_TOKEN, video_token_id=61, vision_start_token_id=62, vision_end_token_id=63)
    return transformers.Qwen2_5_VLForConditionalGeneration(cfg)


def _qwen3vl():
    """A tiny Qwen3-VL (interleaved M-RoPE, DeepStack features added after decoder layer 0)."""
    cfg = transformers.Qwen3VLConfig(
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2],
                                          "mrope_interleaved": True}, bos_token_id=0, eos_token_id=1),
        vision_config=dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, patch_size=2,
                           spatial_merge_size=2, temporal_patch_size=1, out_hidden_size=32, num_position_embeddings=16,
                           deepstack_visual_indexes=[0], in_channels=3),
        image_token_id=IMAGE_TOKEN, video_token_id=61, vision_start_token_id=62, vision_end_token_id=63)
    return transformers.Qwen3VLForConditionalGeneration(cfg)


def _batch(kind, gen):
    """input kwargs, the 2-D attention mask, and a response row mask. Batch 0 left-padded, 1 right."""
    seq = 14
    ids = torch.randint(0, 50, (2, seq), generator=gen)
    mask = torch.ones(2, seq, dtype=torch.long)
    mask[0, :3] = 0
    mask[1, -2:] = 0
    extra = {}
    if kind == "qwen25vl":
        # one 4x4-patch image (-> 4 merged tokens) per sample, placed after the padding
        ids[0, 4:10] = torch.tensor([62, IMAGE_TOKEN, IMAGE_TOKEN, IMAGE_TOKEN, IMAGE_TOKEN, 63])
        ids[1, 1:7] = torch.tensor([62, IMAGE_TOKEN, IMAGE_TOKEN, IMAGE_TOKEN, IMAGE_TOKEN, 63])
        extra = dict(pixel_values=torch.randn(2 * 16, 3 * 1 * 2 * 2, generator=gen),
                     image_grid_thw=torch.tensor([[1, 4, 4], [1, 4, 4]]))
    rows = torch.zeros(2, seq, dtype=torch.bool)
    rows[:, 10:] = True
    rows &= mask.bool()
    return dict(input_ids=ids, attention_mask=mask, **extra), mask.bool(), rows


BUILDERS = {"qwen2": _qwen2, "llama": _llama, "qwen25vl": _qwen25vl}


def _perturbed(model, gen, sd=0.05):
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * sd)
    return other


def _eager(model):
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    return eager


def _paper_div(attn, attn_ref, key_mask):
    """Eq. 2-3 from materialised maps (B, H, S, S): head mean, drop self, renormalise, JSD."""
    s = attn.shape[-1]
    keep = torch.ones(s, s, dtype=torch.bool).tril(-1)[None] & key_mask[:, None, :]

    def policy(a):
        a = torch.where(keep, a.double().mean(1), torch.zeros((), dtype=torch.float64))
        return a / a.sum(-1, keepdim=True).clamp_min(1e-300)

    pi, rho = policy(attn), policy(attn_ref)
    mid = 0.5 * (pi + rho)

    def term(p):
        return torch.where(p > 0, p * (torch.log(p.clamp_min(1e-300)) - torch.log(mid.clamp_min(1e-300))),
                           torch.zeros((), dtype=torch.float64))

    return (0.5 * term(pi) + 0.5 * term(rho)).sum(-1)


def _param_grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["qwen2", "llama", "qwen25vl"])
def test_ral_matches_eager(kind):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    base = BUILDERS[kind]().float()
    old = _perturbed(base, gen)
    inputs, key_mask, rows = _batch(kind, gen)
    eager_new, eager_old = _eager(base), _eager(old)
    new_policy = AttentionPolicy(base, layers=(-1,))
    old_policy = AttentionPolicy(old, layers=(-1,))
    assert base.config._attn_implementation == "ral"

    # record the old weights' reference (a separate model: the teacher / old-policy path)
    with torch.no_grad(), old_policy.record() as rec:
        old_logits = old(**inputs).logits
        eager_old_out = eager_old(**inputs, output_attentions=True)
    ref = rec.reference
    assert isinstance(ref, AttentionReference) and len(ref) == 2
    assert ref.layers[0].q.dim() == 4 and ref.key_padding_mask is not None
    real = key_mask
    torch.testing.assert_close(old_logits[real], eager_old_out.logits[real], atol=2e-5, rtol=1e-4)

    # compare: logits, div and gradients against eager
    w_logits = torch.randn(old_logits.shape, generator=gen)
    w_div = torch.randn(rows.shape, generator=gen)
    with new_policy.compare(ref, row_mask=rows) as cmp:
        logits = base(**inputs).logits
    div = cmp.div
    assert div.shape == rows.shape and div.dtype == torch.float32
    assert bool((div[~rows] == 0).all())
    ((logits * w_logits * real[..., None]).sum() + (div * w_div).sum()).backward()

    out = eager_new(**inputs, output_attentions=True)
    want_div = _paper_div(out.attentions[-1], eager_old_out.attentions[-1].detach(), key_mask)
    want_div = torch.where(rows, want_div, torch.zeros((), dtype=torch.float64))
    ((out.logits * w_logits * real[..., None]).sum() + (want_div.float() * w_div).sum()).backward()

    torch.testing.assert_close(logits[real], out.logits[real], atol=2e-5, rtol=1e-4)
    assert float(div.detach().sum()) > 0
    torch.testing.assert_close(div.double(), want_div, atol=1e-6, rtol=1e-4)
    got, want = _param_grads(base), _param_grads(eager_new)
    assert set(got) == set(want)
    for name in want:
        scale = float(want[name].abs().max()) + 1e-6
        assert float((got[name] - want[name]).abs().max()) <= 2e-4 * scale + 1e-6, name


def test_padding_tokens_are_no_rows():
    """A right-padded token's query attends the real keys before it, so the op gives it a policy; it is
    no row of the sequence, and compare / observe read no policy there: div, entropy and mass are 0 at
    every padding token, with row_mask=None too (before: nonzero at right padding), and at the real
    tokens equal the eager maps' (float32; one row right-padded, one left-padded)."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    base = _qwen2()
    old = _perturbed(base, gen, sd=0.2)
    ids = torch.randint(0, 50, (2, 12), generator=gen)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, 9:] = 0
    mask[1, :2] = 0
    key_mask = mask.bool()
    with torch.no_grad():
        want = _paper_div(_eager(base)(input_ids=ids, attention_mask=mask, output_attentions=True).attentions[-1],
                          _eager(old)(input_ids=ids, attention_mask=mask, output_attentions=True).attentions[-1],
                          key_mask)
    want = torch.where(key_mask, want, torch.zeros((), dtype=torch.float64))
    old_policy, policy = AttentionPolicy(old, backend="reference"), AttentionPolicy(base, backend="reference",
                                                                                     stats=True)
    with torch.no_grad(), old_policy.record() as rec:
        old(input_ids=ids, attention_mask=mask)
    for row_mask in (None, torch.ones(2, 12, dtype=torch.bool)):
        with torch.no_grad(), policy.compare(rec.reference, row_mask=row_mask) as cmp:
            base(input_ids=ids, attention_mask=mask)
        assert float(want[0, 8]) > 1e-4                                  # the last real token of row 0
        torch.testing.assert_close(cmp.div.double(), want, atol=1e-6, rtol=1e-4)
        assert bool((cmp.div[~key_mask] == 0).all()) and bool((cmp.entropy[~key_mask] == 0).all())
    with torch.no_grad(), policy.observe() as obs:
        base(input_ids=ids, attention_mask=mask)
    assert bool((obs.entropy[~key_mask] == 0).all())
    torch.testing.assert_close(obs.entropy, cmp.entropy)               # the same policy's statistics


def _qwen2_with_policy(seed: int):
    """A float32 tiny Qwen2 with an AttentionPolicy on its last layer, and a padded batch."""
    torch.manual_seed(0)
    model = _qwen2().float()
    policy = AttentionPolicy(model)
    inputs, _, rows = _batch("qwen2", torch.Generator().manual_seed(seed))
    return model, policy, inputs, rows


def test_div_zero_against_own_recording_and_slicing():
    model, policy, inputs, rows = _qwen2_with_policy(seed=1)
    with torch.no_grad(), policy.record() as rec:
        logits_rec = model(**inputs).logits
    with policy.compare(rec.reference, row_mask=rows[:, -4:]) as cmp:   # (B, C) row mask, right-aligned
        logits = model(**inputs).logits
    torch.testing.assert_close(logits, logits_rec)          # same kernel: ratio exactly 1
    assert float(cmp.div.detach().abs().max()) < 1e-6
    # minibatch slicing and concatenation of references
    one = {k: v[1:] for k, v in inputs.items()}
    with policy.compare(rec.reference[1:], row_mask=rows[1:]) as cmp1:
        model(**one)
    assert cmp1.div.shape == (1, rows.shape[1])
    both = AttentionReference.cat([rec.reference[:1], rec.reference[1:]])
    assert torch.equal(both.layers[0].q, rec.reference.layers[0].q)
    # outside record/compare the model runs SDPA and matches
    with torch.no_grad():
        plain = model(**inputs).logits
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(plain[real], logits_rec[real], atol=2e-5, rtol=1e-4)


def test_teacher_with_other_heads_as_reference():
    """Distillation: a teacher with different head count / head dim records, the student compares."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(2)
    student = _qwen2().float()
    tcfg = transformers.Qwen2Config(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=3,
                                    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    teacher = transformers.Qwen2ForCausalLM(tcfg).float()
    inputs, key_mask, rows = _batch("qwen2", gen)
    t_policy, s_policy = AttentionPolicy(teacher), AttentionPolicy(student)
    with torch.no_grad(), t_policy.record() as rec:
        teacher(**inputs)
    assert rec.reference.layers[0].q.shape[1:] == (2, 14, 24)
    with s_policy.compare(rec.reference, row_mask=rows) as cmp:
        student(**inputs)
    cmp.div.sum().backward()
    t_out = _eager(teacher)(**inputs, output_attentions=True).attentions[-1]
    s_out = _eager(student)(**inputs, output_attentions=True).attentions[-1]
    want = torch.where(rows, _paper_div(s_out, t_out, key_mask), torch.zeros((), dtype=torch.float64))
    torch.testing.assert_close(cmp.div.double(), want, atol=1e-6, rtol=1e-4)
    assert student.model.layers[-1].self_attn.q_proj.weight.grad is not None
    assert student.model.layers[0].self_attn.q_proj.weight.grad is not None


def test_policy_misuse():
    model = _qwen2()
    with pytest.raises(ValueError, match="layers"):
        AttentionPolicy(model, layers=(5,))
    policy = AttentionPolicy(model, layers=(0, 1))
    assert policy.layers == (0, 1)
    ids = torch.randint(0, 50, (1, 6))
    with torch.no_grad(), policy.record() as rec:
        model(input_ids=ids)
    with pytest.raises(ValueError, match="reference"):
        with policy.compare(rec.reference, row_mask=None):
            model(input_ids=torch.randint(0, 50, (1, 7)))
    assert math.isfinite(float(rec.reference.nbytes()))


def test_record_in_chunks_and_dict_roundtrip():
    model, policy, inputs, rows = _qwen2_with_policy(seed=4)
    with torch.no_grad(), policy.record() as whole:
        model(**inputs)
    with torch.no_grad(), policy.record() as parts:          # TRL-style chunked old-log-prob loop
        for i in range(2):
            model(**{k: v[i:i + 1] for k, v in inputs.items()})
    a, b = whole.reference, parts.reference
    torch.testing.assert_close(a.layers[0].q, b.layers[0].q)
    torch.testing.assert_close(a.layers[0].stats, b.layers[0].stats)
    assert torch.equal(a.key_padding_mask, b.key_padding_mask)
    back = AttentionReference.from_dict({k: v[1:] for k, v in a.to_dict().items()}, a.scales())
    with policy.compare(back, row_mask=rows[1:]) as cmp:
        model(**{k: v[1:] for k, v in inputs.items()})
    assert float(cmp.div.detach().abs().max()) < 1e-6


def test_reference_to():
    model = _qwen2()
    policy = AttentionPolicy(model)
    with torch.no_grad(), policy.record() as rec:
        model(input_ids=torch.randint(0, 50, (2, 5)))
    half = rec.reference.to("cpu", torch.bfloat16)
    assert half.layers[0].q.dtype == torch.bfloat16 and half.layers[0].stats.dtype == torch.float32


def test_compare_with_gradient_checkpointing():
    """The chosen layer is not checkpointed inside compare; the others are; gradients unchanged."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(5)
    model = _qwen2().float()
    old = _perturbed(model, gen)
    inputs, _, rows = _batch("qwen2", gen)
    ref_policy = AttentionPolicy(old)
    with torch.no_grad(), ref_policy.record() as rec:
        old(**inputs)
    grads = []
    for checkpointing in (False, True):
        m = copy.deepcopy(model)
        # activation_checkpointing_enable: transformers 5.25's name (5.17 has only the deprecated one)
        if checkpointing and hasattr(m, "activation_checkpointing_enable"):
            m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        elif checkpointing:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.train()
        policy = AttentionPolicy(m)
        with policy.compare(rec.reference, row_mask=rows) as cmp:
            logits = m(**inputs).logits
        (cmp.div.sum() + logits.float().pow(2).mean()).backward()
        grads.append(_param_grads(m))
        if checkpointing:
            assert m.model.layers[-1].gradient_checkpointing and m.model.layers[0].gradient_checkpointing
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-4, msg=name)


def _qwen2_sliding(window: int):
    """A tiny Qwen2 whose layer 0 attends fully and layer 1 through a sliding window of `window` keys."""
    cfg = transformers.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   use_sliding_window=True, sliding_window=window, max_window_layers=1)
    model = transformers.Qwen2ForCausalLM(cfg).double()
    attn = [layer.self_attn for layer in model.model.layers]
    assert (attn[0].sliding_window, attn[1].sliding_window) == (None, window)
    return model


def test_sliding_window_layers():
    """A full-attention chosen layer beside a sliding-window one gives SDPA's logits (the window stays
    transformers'); a sliding-window chosen layer is refused when a sequence is longer than its window
    and equals SDPA when none is (dense and packed calls). Float64 against transformers' "sdpa" (its
    "eager" rounds the softmax to float32); a window's effect on the logits is ~0.1 here."""
    torch.manual_seed(0)
    model = _qwen2_sliding(window=5)
    sdpa = copy.deepcopy(model)
    sdpa.set_attn_implementation("sdpa")
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        want = sdpa(ids).logits
    policy = AttentionPolicy(copy.deepcopy(model), layers=(0,), backend="reference")
    with torch.no_grad(), policy.record():
        got = policy.model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)

    policy = AttentionPolicy(model, layers=(-1,), backend="reference")
    with pytest.raises(ValueError, match=r"decoder layer 1 is a sliding-window layer \(sliding_window=5\) and this "
                                         r"call has sequences of 12 keys.*\(layers= from \[0\]\)"), \
            torch.no_grad(), policy.record():
        model(ids)
    with torch.no_grad(), policy.record():
        got = model(ids[:, :5]).logits
    with torch.no_grad():
        torch.testing.assert_close(got, sdpa(ids[:, :5]).logits, rtol=1e-12, atol=1e-12)

    flat = ids[:1]
    fits, too_long = (4, 5, 3), (4, 8)
    with torch.no_grad(), policy.record() as rec:
        got = model(flat, position_ids=torch.cat([torch.arange(n) for n in fits])[None]).logits
        want = torch.cat([sdpa(part).logits for part in flat.split(fits, dim=1)], dim=1)
    assert rec.reference.packing is not None
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="sequences of 8 keys"), torch.no_grad(), policy.record():
        model(flat, position_ids=torch.cat([torch.arange(n) for n in too_long])[None])


def llama4_chunked(layers: int):
    """A tiny Llama 4 text model in float64 with chunks of 4 positions: every layer chunked but the
    last (transformers' default layer types); skips the test on a transformers without Llama 4."""
    if not hasattr(transformers, "Llama4ForCausalLM"):
        pytest.skip("this transformers has no Llama 4")
    cfg = transformers.Llama4TextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, intermediate_size_mlp=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64, attention_chunk_size=4,
        num_local_experts=2, num_experts_per_tok=1, moe_layers=[])
    return transformers.Llama4ForCausalLM(cfg).double().eval()


def test_chunked_attention_layers():
    """Llama 4's chunked-attention layers (a query sees only the keys of its own chunk of
    attention_chunk_size positions; transformers says so in that layer's mask alone): chosen, record
    gave logits 0.30 off SDPA's at 12 tokens with chunks of 4. Refused when the call has more key
    positions than a chunk (packed streams counted whole, as transformers cuts its chunks there);
    within one chunk, and for the full-attention layer beside them, SDPA's logits (float64)."""
    torch.manual_seed(0)
    model = llama4_chunked(4)
    assert model.config.layer_types == ["chunked_attention"] * 3 + ["full_attention"]
    sdpa = copy.deepcopy(model)
    sdpa.set_attn_implementation("sdpa")
    ids = torch.randint(0, 64, (2, 12))
    last = AttentionPolicy(copy.deepcopy(model), backend="reference")
    with torch.no_grad(), last.record():
        got = last.model(ids).logits
    torch.testing.assert_close(got, sdpa(ids).logits, rtol=1e-12, atol=1e-12)

    policy = AttentionPolicy(model, layers=(0,), backend="reference")
    with pytest.raises(ValueError, match=r"decoder layer 0 is a chunked-attention layer \(attention_chunk_size=4: .*"
                                         r"this call has 12 key positions.*\(layers= from \[3\]\)"), \
            torch.no_grad(), policy.record():
        model(ids)
    with torch.no_grad(), policy.record():
        got = model(ids[:, :4]).logits
    torch.testing.assert_close(got, sdpa(ids[:, :4]).logits, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="this call has 6 key positions"), torch.no_grad(), policy.record():
        model(ids[:1, :6], position_ids=torch.tensor([[0, 1, 2, 0, 1, 2]]))


def gemma3_vlm():
    """policy_campaign's tiny Gemma 3 VLM in float64 on "sdpa"; skips the test on a transformers
    without Gemma 3."""
    if not hasattr(transformers, "Gemma3ForConditionalGeneration"):
        pytest.skip("this transformers has no Gemma 3")
    from policy_campaign import tiny_gemma3_vlm
    return tiny_gemma3_vlm(torch.float64)


def test_bidirectional_layer_masks():
    """Gemma 3's VLM lets the image tokens of one image attend to each other both ways (token_type_ids;
    transformers says so only in the layers' masks). A chosen layer gave logits 0.038 off SDPA's at the
    image rows (last layer) or 9.4e-4 at the text rows after the image (layer 0). The chosen layer's
    mask is now compared with causal attention over the padding: the rows where it differs get
    transformers' SDPA under that mask, so record gives SDPA's logits at every real row, and a policy
    read at such a row (row_mask) is a ValueError; after the image, compare works as ever. Float64."""
    torch.manual_seed(0)
    model = gemma3_vlm()
    sdpa = copy.deepcopy(model)
    # row 0: six padding tokens, then its image at 8..11; row 1: its image at 4..7, so that rows 4, 5 of
    # the image rows' union are padding in row 0 (fully masked there: they must not bring NaN)
    ids = torch.randint(3, 250, (2, 14))
    ids[0, 7], ids[0, 8:12], ids[0, 12] = 261, 260, 262
    ids[1, 3], ids[1, 4:8], ids[1, 8] = 261, 260, 262
    mask = torch.ones(2, 14, dtype=torch.long)
    mask[0, :6] = 0
    call = dict(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(2, 3, 28, 28, dtype=torch.float64),
                token_type_ids=(ids == 260).long())
    with torch.no_grad():
        want = sdpa(**call).logits
    after_image = torch.zeros(2, 14, dtype=torch.bool)
    after_image[0, 13:] = True
    after_image[1, 9:] = True
    for layers in ((-1,), (0,)):
        policy = AttentionPolicy(copy.deepcopy(model), layers=layers, backend="reference")
        with torch.no_grad(), policy.record() as rec:
            got = policy.model(**call).logits
        torch.testing.assert_close(got[mask.bool()], want[mask.bool()], rtol=1e-12, atol=1e-12)
        with policy.compare(rec.reference, row_mask=after_image) as cmp:
            got = policy.model(**call).logits[mask.bool()]
        torch.testing.assert_close(got, want[mask.bool()], rtol=1e-12, atol=1e-12)
        assert cmp.div.abs().max() < 1e-12 and cmp.div.requires_grad
        # gradients through the replaced rows: the weights' gradients of the logits equal SDPA's
        got.sum().backward()
        sdpa.zero_grad()
        sdpa(**call).logits[mask.bool()].sum().backward()
        for (name, p), q in zip(policy.model.named_parameters(), sdpa.parameters()):
            if q.grad is not None:
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12, msg=name)
        for rows, block in ((None, "compare"), (after_image | (ids == 260), "compare"), (None, "observe")):
            ctx = policy.compare(rec.reference, row_mask=rows) if block == "compare" else policy.observe()
            with pytest.raises(ValueError, match=r"row_mask: the mask transformers built for decoder layer \d is "
                                                 r"not causal attention over the padding at 6 query rows .* "
                                                 r"\(batch row 0, query 8\)"), torch.no_grad(), ctx:
                policy.model(**call)

    # the rows found, on an additive (float) mask: 0 where attended, the dtype's minimum elsewhere; any
    # other value is a bias; and a hidden earlier key
    policy = AttentionPolicy(_qwen2(), backend="reference")
    kpm = mask.bool()
    causal = torch.ones(14, 14, dtype=torch.bool).tril()[None, None] & kpm[:, None, None, :]
    additive = torch.zeros(2, 1, 14, 14).masked_fill(~causal, torch.finfo(torch.float32).min)
    assert policy._noncausal_rows(additive, kpm, 14, 14) is None
    biased = additive.clone()
    biased[1, 0, 3, 1] = -0.5
    hidden = causal.clone()
    hidden[0, 0, 9, 8] = False
    for bad, row in ((biased, (1, 3)), (hidden, (0, 9))):
        found = policy._noncausal_rows(bad, kpm, 14, 14)
        assert found.nonzero().tolist() == [list(row)]


def test_bidirectional_layer_masks_packed():
    """The same Gemma 3 image blocks in a packed (padding-free) call: transformers builds the chosen
    layer a block-diagonal mask with each image bidirectional, and the packed path attended causally
    per sequence instead (logits 0.050 off). The mask is now compared within each packed sequence:
    its image rows get transformers' SDPA under it, and the logits equal the two sequences run
    one by one; the policy is read after the images; the keys of other sequences are not compared
    (a mask that ignores the packing is causal within each sequence). Float64. Every sequence has
    its image at the same positions: transformers 5.25 looks a packed row's image blocks up by
    position id, so other positions get misplaced blocks in its own mask (and the model, ral's
    chosen layer included, follows that mask)."""
    from ral.integrations.transformers import Packing
    torch.manual_seed(1)
    model = gemma3_vlm()
    sdpa = copy.deepcopy(model)
    ids = torch.randint(3, 250, (2, 14))              # each row: two sequences of 7, an image at 2..5 of each
    for start in (0, 7):
        ids[:, start + 1], ids[:, start + 2:start + 6], ids[:, start + 6] = 261, 260, 262
    pixels = torch.randn(4, 3, 28, 28, dtype=torch.float64)
    positions = torch.arange(7).repeat(2)[None]

    def packed(rows):
        return dict(input_ids=ids[:rows], position_ids=positions.expand(rows, -1), use_cache=False,
                    pixel_values=pixels[:2 * rows], token_type_ids=(ids[:rows] == 260).long())

    with torch.no_grad():                             # the peer: each sequence alone
        want = torch.cat([torch.cat([sdpa(input_ids=ids[b:b + 1, s:s + 7], pixel_values=pixels[2 * b + s // 7][None],
                                          token_type_ids=(ids[b:b + 1, s:s + 7] == 260).long()).logits
                                     for s in (0, 7)], 1) for b in range(2)])
    after_image = torch.zeros(1, 14, dtype=torch.bool)
    after_image[0, [6, 13]] = True
    for layers in ((-1,), (0,)):
        policy = AttentionPolicy(copy.deepcopy(model), layers=layers, backend="reference")
        with torch.no_grad(), policy.record() as rec:
            got = policy.model(**packed(2)).logits    # two packed rows (B = 2, flattened batch-major)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        with torch.no_grad(), policy.record() as rec:
            policy.model(**packed(1))
        with policy.compare(rec.reference, row_mask=after_image) as cmp:
            got = policy.model(**packed(1)).logits
        torch.testing.assert_close(got, want[:1], rtol=1e-12, atol=1e-12)
        assert cmp.div.shape == (1, 14) and cmp.div.abs().max() < 1e-12 and cmp.div.requires_grad
        got.sum().backward()                          # the weights' gradients equal SDPA's on the packed call
        sdpa.zero_grad()
        sdpa(**packed(1)).logits.sum().backward()
        for (name, p), q in zip(policy.model.named_parameters(), sdpa.parameters()):
            if q.grad is not None:
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12, msg=name)
        for ctx in (policy.compare(rec.reference), policy.observe()):
            with pytest.raises(ValueError, match=r"not causal attention within each packed sequence at 6 query rows "
                                                 r".* \(batch row 0, query 2\)"), torch.no_grad(), ctx:
                policy.model(**packed(1))

    # the comparison itself: keys of other sequences are not compared, causal keys within one are
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    packing = Packing(cu, cu, 7, 7)
    whole_row = torch.ones(12, 12, dtype=torch.bool).tril()[None, None]        # a mask that ignores packing
    assert policy._noncausal_rows(whole_row, None, 12, 12, packing=packing) is None
    hidden = whole_row.clone()
    hidden[0, 0, 8, 6] = False                                                 # a causal key of row 8's sequence
    bidirectional = whole_row.clone()
    bidirectional[0, 0, 1, 2] = True                                           # a later key of the same sequence
    for bad, row in ((hidden, 8), (bidirectional, 1)):
        found = policy._noncausal_rows(bad, None, 12, 12, packing=packing)
        assert found.nonzero().tolist() == [[0, row]]

    # the replaced rows of a packed call: the layer's mask within their own sequence only, even where
    # the mask (built without the packing) lets them see another sequence; float64 softmax as the oracle
    from ral.integrations.transformers import _with_model_rows
    module = AttentionPolicy(_qwen2().double(), backend="reference").modules[0]     # 4 heads over 2 kv heads
    q, k, v = torch.randn(1, 4, 12, 8, dtype=torch.float64), *torch.randn(2, 1, 2, 12, 8, dtype=torch.float64)
    block = whole_row.clone()
    block[0, 0, 6:9, 6:9] = True                                      # a bidirectional block in sequence 1
    found = policy._noncausal_rows(block, None, 12, 12, packing=packing)
    assert found.nonzero()[:, 1].tolist() == [6, 7]
    for mask in (block, torch.zeros(block.shape, dtype=torch.float64).masked_fill(~block, -1e300)):
        got = _with_model_rows(torch.zeros(1, 4, 12, 8, dtype=torch.float64), found, module, q, k, v, mask, 0.35,
                               packing)
        own = block & (torch.arange(12) >= 5)[None, :]                 # rows 6, 7 see keys 5.. only
        scores = (q @ k.repeat_interleave(2, 1).transpose(-1, -2) * 0.35).masked_fill(~own, float("-inf"))
        want = scores.softmax(-1) @ v.repeat_interleave(2, 1)
        torch.testing.assert_close(got[:, :, 6:8], want[:, :, 6:8], rtol=1e-12, atol=1e-12)
        assert bool((got[:, :, :6] == 0).all() and (got[:, :, 8:] == 0).all())


def test_packed_gemma3_rows_follow_the_model_mask(capsys):
    """transformers 5.25 looks a packed Gemma 3 row's image blocks up by position id: a second sequence
    whose image sits at other positions than the first's gets misplaced blocks, and transformers' own
    packed call differs from the sequence run alone (printed: 0.258 here). The chosen layer follows the
    model's mask like every other layer: record's logits equal transformers' packed SDPA, not the
    sequences alone, and the rows the mask makes non-causal are refused to the policy, its end-of-image
    token (position 6 of the second sequence) among them."""
    torch.manual_seed(0)
    model = gemma3_vlm()
    sdpa = copy.deepcopy(model)
    first = torch.tensor([5, 6, 7, 261, 260, 260, 260, 260, 262, 9])       # its image at positions 4..7
    second = torch.tensor([5, 261, 260, 260, 260, 260, 262, 8, 9])         # its image at positions 2..5
    ids = torch.cat([first, second])[None]
    pixels = torch.randn(2, 3, 28, 28, dtype=torch.float64)
    call = dict(input_ids=ids, position_ids=torch.cat([torch.arange(10), torch.arange(9)])[None],
                pixel_values=pixels, token_type_ids=(ids == 260).long(), use_cache=False)
    with torch.no_grad():
        want = sdpa(**call).logits
        alone = sdpa(input_ids=second[None], pixel_values=pixels[1:], token_type_ids=(second[None] == 260).long()).logits
    with capsys.disabled():
        print(f"\ntransformers' packed Gemma 3 call, second sequence against it alone: "
              f"{float((want[0, 10:] - alone[0]).abs().max()):.3f}")
    policy = AttentionPolicy(model, layers=(0,), backend="reference")
    with torch.no_grad(), policy.record() as rec:
        got = model(**call).logits
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    rows = torch.zeros(1, 19, dtype=torch.bool)
    rows[0, 16] = True                                                     # the second sequence's <eoi>
    with pytest.raises(ValueError, match=r"within each packed sequence at 6 query rows .* \(batch row 0, query 16\)"), \
            torch.no_grad(), policy.compare(rec.reference, row_mask=rows):
        model(**call)


def test_attention_beyond_sdpa_refused():
    """Score-changing attention arguments reach a chosen layer only as a ValueError, and a model that
    transformers runs without SDPA (soft-capping, sinks) is refused when the policy is made."""
    cfg = transformers.Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                    max_position_embeddings=64, attn_logit_softcapping=5.0)
    cfg._attn_implementation = "eager"
    with pytest.raises(ValueError, match="model: Gemma2ForCausalLM has no SDPA attention"):
        AttentionPolicy(transformers.Gemma2ForCausalLM(cfg))
    # attention both ways (PaliGemma's language model, an encoder): the error says why
    cfg = transformers.GemmaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                   use_bidirectional_attention=True)
    with pytest.raises(ValueError, match=r"no causal decoder attention .*\(model.layers.0.self_attn, ...\) say "
                                         r"is_causal=False"):
        AttentionPolicy(transformers.GemmaForCausalLM(cfg))

    from ral.integrations.transformers import ral_attention_forward
    model = _qwen2()
    policy = AttentionPolicy(model, backend="reference")
    module = policy.modules[0]
    q, k = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 6, 8)
    for name, what in (("softcap", "soft-capping"), ("s_aux", "sinks"), ("position_bias", "position bias")):
        with pytest.raises(ValueError, match=f"decoder layer 1 applies .*{what}"), torch.no_grad(), policy.record():
            ral_attention_forward(module, q, k, k.clone(), None, scaling=8 ** -0.5, **{name: torch.zeros(())})
    with torch.no_grad():                             # outside a block the layer is transformers' SDPA, as before
        out, _ = ral_attention_forward(module, q, k, k.clone(), None, scaling=8 ** -0.5, s_aux=None)
    assert out.shape == (1, 6, 4, 8)


def test_custom_masks_refused_in_blocks():
    """A model call inside record / compare with a mask other than 2-D (a 4-D block mask, masks per
    layer type) is refused: the chosen layers would attend across the blocks. Outside the blocks
    the same call is transformers' SDPA with that mask."""
    model, policy, inputs, rows = _qwen2_with_policy(seed=5)
    ids = inputs["input_ids"][:1, :8]
    block = torch.zeros(8, 8, dtype=torch.bool)
    block[:4, :4] = block[4:, 4:] = True
    block = (block & torch.ones(8, 8, dtype=torch.bool).tril())[None, None]
    additive = torch.zeros(block.shape).masked_fill(~block, torch.finfo(torch.float32).min)
    with torch.no_grad(), policy.record() as rec:
        model(input_ids=ids)
    for mask in (additive, {"full_attention": additive}):
        with pytest.raises(ValueError, match="attention_mask: the chosen layers mask by a 2-D padding mask"), \
                torch.no_grad(), policy.record():
            model(input_ids=ids, attention_mask=mask)
        with pytest.raises(ValueError, match="inside compare got a custom mask"), policy.compare(rec.reference):
            model(input_ids=ids, attention_mask=mask)
    sdpa = copy.deepcopy(model)
    sdpa.set_attn_implementation("sdpa")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=additive).logits,
                                   sdpa(input_ids=ids, attention_mask=additive).logits, rtol=0, atol=0)


def test_hybrid_model_indexes_its_softmax_attention_layers():
    """Qwen3-Next (three gated-delta-net layers, then one softmax-attention layer): ``layers`` counts the
    softmax-attention layers only, so (-1,) is decoder layer 3, and record gives SDPA's logits."""
    if not hasattr(transformers, "Qwen3NextForCausalLM"):
        pytest.skip("this transformers has no Qwen3-Next")
    torch.manual_seed(0)
    cfg = transformers.Qwen3NextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, linear_num_value_heads=2,
        linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8, num_experts=2,
        num_experts_per_tok=1, moe_intermediate_size=16, shared_expert_intermediate_size=16)
    model = transformers.Qwen3NextForCausalLM(cfg).eval()
    sdpa = copy.deepcopy(model)
    sdpa.set_attn_implementation("sdpa")
    with pytest.raises(ValueError, match=r"out of range for the model's 1 softmax-attention decoder layers "
                                         r"\(decoder layers \[3\]\)"):
        AttentionPolicy(model, layers=(3,))
    policy = AttentionPolicy(model, backend="reference")
    assert [m.layer_idx for m in policy.modules] == [3]
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad(), policy.record() as rec:
        got = model(ids).logits
    with torch.no_grad():
        torch.testing.assert_close(got, sdpa(ids).logits, rtol=1e-5, atol=1e-6)
    assert len(rec.reference.layers) == 1


def test_kv_cache_calls_refused_in_blocks():
    """Incremental decoding inside record / compare (generate, or a call with a cache) is refused with a
    ValueError naming the mode, not recorded or compared on the last token's queries alone."""
    model, policy, inputs, rows = _qwen2_with_policy(seed=6)
    ids = inputs["input_ids"][:, -6:]
    with pytest.raises(ValueError, match=r"record: the chosen layers take full-sequence passes; this model call "
                                         r"has 1 queries over 7 keys"), torch.no_grad(), policy.record():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
        with policy.record() as rec:
            model(ids)
    with pytest.raises(ValueError, match="compare: the chosen layers take full-sequence passes"), \
            policy.compare(rec.reference):
        model(ids[:, -1:], past_key_values=cache, use_cache=True)


def test_compare_on_other_padding_refused():
    """compare with a padding mask other than the record call's is refused (the reference's row
    statistics normalise its attention over the recorded keys only: with more keys its "distribution"
    would not sum to 1); the same mask gives div 0 at the recorded weights, none takes the reference's."""
    model, policy, inputs, rows = _qwen2_with_policy(seed=7)
    mask = inputs["attention_mask"]
    other = mask.clone()
    other[1, :] = 1
    assert not torch.equal(other, mask)
    with torch.no_grad(), policy.record() as rec:
        model(**inputs)
    with pytest.raises(ValueError, match=r"attention_mask: batch rows \[1\] pad other keys than the reference"), \
            torch.no_grad(), policy.compare(rec.reference, row_mask=rows):
        model(input_ids=inputs["input_ids"], attention_mask=other)
    with torch.no_grad(), policy.compare(rec.reference, row_mask=rows) as cmp:
        model(**inputs)
    assert float(cmp.div.abs().max()) < 1e-6
    with torch.no_grad(), policy.compare(rec.reference, row_mask=rows) as cmp:   # the chosen layer: the
        model(input_ids=inputs["input_ids"])                                      # reference's padding
    assert bool(torch.isfinite(cmp.div).all())


def test_policy_options_checked_when_made():
    """Options the op would refuse only at the first model call inside a block (in TRL: after the first
    generation) are refused when the policy is made, naming the option."""
    model = _qwen2()
    for kw, error, message in ((dict(divergence="js"), ValueError, "divergence must be one of"),
                               (dict(heads="all"), ValueError, "heads must be one of"),
                               (dict(backend="gpu"), ValueError, "backend must be one of"),
                               (dict(exclude_self=1), TypeError, "exclude_self must be a bool"),
                               (dict(record_stats="yes"), TypeError, "record_stats must be a bool"),
                               (dict(layers=-1), TypeError, "layers must be a non-empty sequence of ints"),
                               (dict(layers=()), TypeError, "layers must be a non-empty sequence of ints"),
                               # the same layer twice: accepted, then "the chosen layers did not run" at record
                               (dict(layers=(-1, 1)), ValueError, r"names softmax-attention layer 1 twice"),
                               (dict(layers=(2,)), ValueError, "out of range")):
        with pytest.raises(error, match=message):
            AttentionPolicy(model, **kw)
        assert model.config._attn_implementation == "sdpa"        # a refused policy leaves the model as it was
    assert AttentionPolicy(model, layers=[0, -1]).layers == (0, 1)


def test_policies_sharing_a_layer():
    """Two policies on the same layer (a trainer made twice over one model, a diagnostics policy beside
    the trainer's): the later one took the layer, and the earlier one's record raised "the chosen layers
    did not run". Each now runs its own blocks with the same numbers as one policy alone; two blocks open
    on the layer at once are a ValueError; removing one leaves the other working."""
    torch.manual_seed(0)
    model = _qwen2().double().eval()
    gen = torch.Generator().manual_seed(1)
    inputs, mask, rows = _batch("qwen2", gen)
    first, second = AttentionPolicy(model, backend="reference"), AttentionPolicy(model, backend="reference")
    refs = []
    for policy in (first, second):
        with torch.no_grad(), policy.record() as rec:
            model(**inputs)
        refs.append(rec.reference)
    torch.testing.assert_close(refs[0].layers[0].q, refs[1].layers[0].q, rtol=0, atol=0)
    with torch.no_grad():
        for p in model.model.layers[-1].self_attn.q_proj.parameters():
            p.add_(0.05)
    divs = []
    for policy, ref in zip((first, second), refs):
        with torch.no_grad(), policy.compare(ref, row_mask=rows) as cmp:
            model(**inputs)
        divs.append(cmp.div)
    assert divs[0][rows].min() > 0
    torch.testing.assert_close(divs[0], divs[1], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"decoder layer 1 is chosen by 2 AttentionPolicy objects whose blocks "
                                         r"are open at once \(record, observe\)"):
        with torch.no_grad(), first.record(), second.observe():
            model(**inputs)
    first.remove()
    with torch.no_grad(), second.compare(refs[1], row_mask=rows) as cmp:
        model(**inputs)
    torch.testing.assert_close(cmp.div, divs[1], rtol=0, atol=0)


def test_model_keeps_its_own_attention_outside_the_chosen_layers():
    """A model on an implementation other than sdpa / eager (here a registered, counting SDPA standing in
    for flash_attention_2) is switched to "ral+<it>": its other layers keep calling it, the chosen
    layer runs the op inside the blocks and the implementation outside them; logits equal SDPA's
    (float64)."""
    from counting_attention import register_counting_sdpa
    calls = register_counting_sdpa("counted_sdpa")
    torch.manual_seed(0)
    model = _qwen2().double()
    sdpa = copy.deepcopy(model)
    sdpa.set_attn_implementation("sdpa")
    model.set_attn_implementation("counted_sdpa")
    policy = AttentionPolicy(model, backend="reference")
    assert model.config._attn_implementation == "ral+counted_sdpa"
    inputs, _, rows = _batch("qwen2", torch.Generator().manual_seed(8))
    with torch.no_grad():
        want = sdpa(**inputs).logits
        with policy.record() as rec:
            got = model(**inputs).logits
        assert calls == [0]                           # layer 1, the chosen one, ran the op
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        with policy.compare(rec.reference, row_mask=rows) as cmp:
            model(**inputs)
        assert float(cmp.div.abs().max()) < 1e-12 and calls == [0, 0]
        torch.testing.assert_close(model(**inputs).logits, want, rtol=1e-12, atol=1e-12)
    assert calls == [0, 0, 0, 1]                      # outside the blocks: both layers
    AttentionPolicy(model, backend="reference")       # a second policy keeps "ral+counted_sdpa"
    assert model.config._attn_implementation == "ral+counted_sdpa"



def test_policy_campaign(monkeypatch, tmp_path):
    """tests/policy_campaign.py (random AttentionPolicy calls against eager maps of each sequence
    alone) on its first 18 seeds: every layout (padded, plain, packed by position ids or by
    cu_seq_lens), gradients, observe, a one-rank cp_group and the Gemma 3 VLM drawn, none failing. It
    has teeth: with padding tokens read as rows again (the bug it found), seed 14's div and gradients
    are off."""
    import torch.distributed as dist

    import policy_campaign
    draws = []
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        for seed in range(18):
            draw, errors, bad = policy_campaign.draw_and_check(seed, dist.group.WORLD)
            assert not bad, (draw, errors)
            draws.append(draw)
    finally:
        dist.destroy_process_group()
    assert {d["layout"] for d in draws} == {"padded", "plain", "packed-positions", "packed-cu"}
    assert any(d["gradients"] for d in draws) and any(d["observe"] for d in draws)
    assert any(d["backend"] == "cpu" for d in draws) and any(d["cp"] for d in draws)
    assert any(d["gemma3_vlm"] and d["images"] for d in draws)

    import ral.integrations.transformers as integration
    full = integration._row_mask_full
    monkeypatch.setattr(integration, "_row_mask_full", lambda row_mask, seq_len, kpm=None: full(row_mask, seq_len))
    _, errors, bad = policy_campaign.draw_and_check(14)
    assert "div" in bad and "gradients (relative)" in bad and errors["div"] > 1e-3
