"""Attention statistics through ``AttentionPolicy`` (docs/design.md, "Attention statistics"): the
entropy and the per-segment mass of the chosen layer's policy, from the same op call as the
divergence (``compare``) or alone (``observe``), against the same numbers computed from eager
``output_attentions`` maps of the tiny Qwen2.5-VL made in code; padded (left and right) and packed
inputs; and the statistics loss of ``ral.losses`` with its gradient against float64 eager maps.
"""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from ral.integrations.transformers import VL_SEGMENTS, AttentionPolicy, token_segments  # noqa: E402
from ral.losses import attention_stats_loss  # noqa: E402
from test_packed_integration import _case, _packed, _padded, _response_rows, _vision_inputs  # noqa: E402
from test_transformers_integration import IMAGE_TOKEN, _batch, _eager, _param_grads, _perturbed, _qwen2, _qwen25vl  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

BACKENDS = ["reference", "cpu"]
VIDEO_TOKEN = 61


def eager_statistics(attn, key_mask, segments, num_segments=3):
    """entropy (B, S) and mass (B, S, num_segments) of the paper's policy from eager maps (B, H, S, S):
    head mean, self and padding dropped, renormalised; float64."""
    s = attn.shape[-1]
    keep = torch.ones(s, s, dtype=torch.bool).tril(-1)[None] & key_mask[:, None, :]
    p = torch.where(keep, attn.double().mean(1), torch.zeros((), dtype=torch.float64))
    pi = p / p.sum(-1, keepdim=True).clamp_min(1e-300)
    entropy = -torch.where(pi > 0, pi * torch.log(pi.clamp_min(1e-300)), torch.zeros((), dtype=torch.float64)).sum(-1)
    mass = pi @ torch.nn.functional.one_hot(segments, num_segments).double()
    return entropy, mass


def _masked(x, rows):
    return torch.where(rows.view(rows.shape + (1,) * (x.dim() - rows.dim())), x, torch.zeros((), dtype=x.dtype))


def _vl_batch(seed):
    """The tiny Qwen2.5-VL batch of test_transformers_integration (row 0 left padded, row 1 right),
    with one prompt token turned into the video token so that all three segments occur."""
    gen = torch.Generator().manual_seed(seed)
    inputs, key_mask, rows = _batch("qwen25vl", gen)
    inputs["input_ids"][0, 3] = VIDEO_TOKEN            # a text position: segment 2 by its id alone
    return inputs, key_mask, rows, gen


@pytest.mark.parametrize("backend", BACKENDS)
def test_compare_and_observe_statistics_match_eager_maps(backend):
    torch.manual_seed(0)
    base = _qwen25vl().float()
    inputs, key_mask, rows, gen = _vl_batch(0)
    old = _perturbed(base, gen)
    policy = AttentionPolicy(base, backend=backend, stats=True)
    old_policy = AttentionPolicy(old, backend=backend)
    assert policy.segment_names == VL_SEGMENTS and old_policy.stats is False
    segments = token_segments(inputs["input_ids"], IMAGE_TOKEN, VIDEO_TOKEN)
    assert set(segments[key_mask].tolist()) == {0, 1, 2}
    with torch.no_grad(), old_policy.record() as rec:
        old(**inputs)
    with torch.no_grad():
        attn = _eager(base)(**inputs, output_attentions=True).attentions[-1]
    want_entropy, want_mass = eager_statistics(attn, key_mask, segments)
    want_entropy, want_mass = _masked(want_entropy, rows), _masked(want_mass, rows)
    assert float(want_mass[..., 1].max()) > 0.05            # the rows do look at the image

    with torch.no_grad(), policy.compare(rec.reference, row_mask=rows) as cmp:
        base(**inputs)
    with torch.no_grad(), policy.observe(row_mask=rows) as obs:
        base(**inputs)
    for got in (cmp, obs):
        assert got.entropy.shape == rows.shape and got.mass.shape == rows.shape + (3,)
        torch.testing.assert_close(got.entropy.double(), want_entropy, atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(got.mass.double(), want_mass, atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(got.mass_by_segment()["image"], got.mass[..., 1])
    assert float(cmp.div.abs().max()) > 0
    with pytest.raises(RuntimeError, match="observe"):
        obs.div

    # caller-given segment ids and names (here: image tokens vs everything else)
    named = AttentionPolicy(base, backend=backend, segment_names=("other", "image"))
    with torch.no_grad(), named.observe(row_mask=rows, key_segments=(inputs["input_ids"] == IMAGE_TOKEN).long()) as own:
        base(**inputs)
    assert own.segment_names == ("other", "image")
    torch.testing.assert_close(own.mass[..., 1].double(), want_mass[..., 1], atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(own.entropy, obs.entropy)
    with torch.no_grad(), named.observe(row_mask=rows) as no_ids:     # no ids given: entropy only
        base(**inputs)
    assert no_ids.mass is None and no_ids.mass_by_segment() == {}
    torch.testing.assert_close(no_ids.entropy, obs.entropy)


def test_no_statistics_unless_asked():
    torch.manual_seed(0)
    model = _qwen2().float()
    policy = AttentionPolicy(model, backend="reference")
    assert policy.segment_names is None
    inputs, _, rows = _batch("qwen2", torch.Generator().manual_seed(3))
    with torch.no_grad(), policy.record() as rec:
        model(**inputs)
    with torch.no_grad(), policy.compare(rec.reference, row_mask=rows) as cmp:
        model(**inputs)
    assert cmp.entropy is None and cmp.mass is None
    policy.stats = True                                  # a text model: entropy, no segments
    with torch.no_grad(), policy.compare(rec.reference, row_mask=rows) as cmp:
        model(**inputs)
    assert cmp.entropy.shape == rows.shape and cmp.mass is None
    assert bool((cmp.entropy[~rows] == 0).all()) and float(cmp.entropy[rows].min()) > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_statistics_match_padded_and_eager(backend):
    base, old, seqs, positions, gen = _case("qwen25vl")
    rows = _response_rows(seqs)
    vision_state = gen.get_state()
    results = {}
    layouts = {"left": _padded("qwen25vl", seqs, positions, "left"),
               "right": _padded("qwen25vl", seqs, positions, "right"),
               **{how: _packed("qwen25vl", seqs, positions, how) for how in ("positions", "flash_kwargs")}}
    policy, old_policy = AttentionPolicy(base, backend=backend, stats=True), AttentionPolicy(old, backend=backend)
    for name, (inputs, index) in layouts.items():
        gen.set_state(vision_state)
        inputs.update(_vision_inputs("qwen25vl", seqs, inputs["input_ids"], gen))
        shape = inputs["input_ids"].shape
        layout_rows = torch.zeros(shape.numel(), dtype=torch.bool)
        layout_rows[index] = rows
        with torch.no_grad(), old_policy.record() as rec:
            old(**inputs)
        with torch.no_grad(), policy.compare(rec.reference, row_mask=layout_rows.view(shape)) as cmp:
            base(**inputs)
        with torch.no_grad(), policy.observe(row_mask=layout_rows.view(shape)) as obs:
            base(**inputs)
        assert cmp.entropy.shape == shape and cmp.mass.shape == shape + (3,)
        results[name] = [t.reshape(-1, *t.shape[2:])[index] for t in (cmp.entropy, cmp.mass, obs.entropy, obs.mass)]
        if name == "left":
            with torch.no_grad():
                attn = _eager(base)(**inputs, output_attentions=True).attentions[-1]
            segments = token_segments(inputs["input_ids"], IMAGE_TOKEN, VIDEO_TOKEN)
            want = [_masked(t, layout_rows.view(shape)).reshape(-1, *t.shape[2:])[index]
                    for t in eager_statistics(attn, inputs["attention_mask"].bool(), segments)]
    assert float(want[1][:, 1].max()) > 0.05
    for name, (entropy, mass, obs_entropy, obs_mass) in results.items():
        for got, expected in ((entropy, want[0]), (mass, want[1]), (obs_entropy, want[0]), (obs_mass, want[1])):
            torch.testing.assert_close(got.double(), expected, atol=2e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_heads_each_statistics_packed_equal_padded(backend):
    base, old, seqs, positions, gen = _case("qwen25vl")
    rows = _response_rows(seqs)
    vision_state = gen.get_state()
    got = []
    policy = AttentionPolicy(base, backend=backend, heads="each")
    for inputs, index in (_padded("qwen25vl", seqs, positions, "left"),
                          _packed("qwen25vl", seqs, positions, "positions")):
        gen.set_state(vision_state)
        inputs.update(_vision_inputs("qwen25vl", seqs, inputs["input_ids"], gen))
        shape = inputs["input_ids"].shape
        layout_rows = torch.zeros(shape.numel(), dtype=torch.bool)
        layout_rows[index] = rows
        with torch.no_grad(), policy.observe(row_mask=layout_rows.view(shape)) as obs:
            base(**inputs)
        assert obs.entropy.shape == (shape[0], 4, shape[1]) and obs.mass.shape == (shape[0], 4, shape[1], 3)
        got.append([t.movedim(1, 2).reshape(-1, *t.shape[1:2], *t.shape[3:])[index] for t in (obs.entropy, obs.mass)])
    assert float(got[0][1][..., 1].max()) > 0.05
    for a, b in zip(*got):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("entropy_coef,mass_coef", [(0.0, 1.0), (0.5, 0.0), (0.3, 2.0)])
def test_statistics_loss_gradient_matches_eager_float64(entropy_coef, mass_coef):
    """attention_stats_loss through the op (reference backend, float64) against the same loss from
    eager maps: equal values and parameter gradients; a small step against the gradient raises
    the image mass (mass_coef > 0) / the entropy (entropy_coef > 0), the documented sign."""
    torch.manual_seed(0)
    model = _qwen25vl().double()
    inputs, key_mask, rows, _ = _vl_batch(1)
    inputs["pixel_values"] = inputs["pixel_values"].double()
    inputs["attention_mask"][0] = 1        # no left padding: float64 eager turns fully masked rows into NaN
    key_mask = inputs["attention_mask"].bool()
    response = rows[:, 10:]
    eager = _eager(model)
    policy = AttentionPolicy(model, backend="reference")
    kw = dict(entropy_coef=entropy_coef, mass_coef=mass_coef, segments=(1,), loss_type="grpo")

    with policy.observe(row_mask=rows) as obs:
        model(**inputs)
    loss = attention_stats_loss(obs.entropy, obs.mass, response, **kw)
    loss.backward()
    attn = eager(**inputs, output_attentions=True).attentions[-1]
    entropy, mass = eager_statistics(attn, key_mask, token_segments(inputs["input_ids"], IMAGE_TOKEN, VIDEO_TOKEN))
    want = attention_stats_loss(entropy, mass, response, **kw)
    want.backward()
    assert loss.dtype == want.dtype == torch.float64
    torch.testing.assert_close(loss, want, atol=1e-9, rtol=1e-6)
    got_grads, want_grads = _param_grads(model), _param_grads(eager)
    assert set(got_grads) == set(want_grads) and any(float(g.abs().max()) > 0 for g in got_grads.values())
    top = max(float(g.abs().max()) for g in want_grads.values())
    for name, g in want_grads.items():   # eager attention takes its softmax in float32: ~1e-6 relative
        assert float((got_grads[name] - g).abs().max()) <= 1e-5 * top, name

    stepped = copy.deepcopy(eager)
    with torch.no_grad():
        for p, g in zip(stepped.parameters(), eager.parameters()):
            if g.grad is not None:
                p.sub_(1e-2 * g.grad)
    (e0, m0), (e1, m1) = (_statistics_of(m, inputs, key_mask) for m in (eager, stepped))
    assert float(attention_stats_loss(e1, m1, response, **kw)) < float(want.detach())
    if mass_coef and not entropy_coef:
        assert float(m1[..., 1][rows].mean()) > float(m0[..., 1][rows].mean())
    if entropy_coef and not mass_coef:
        assert float(e1[rows].mean()) > float(e0[rows].mean())


def _statistics_of(model, inputs, key_mask):
    with torch.no_grad():
        attn = model(**inputs, output_attentions=True).attentions[-1]
    return eager_statistics(attn, key_mask, token_segments(inputs["input_ids"], IMAGE_TOKEN, VIDEO_TOKEN))


def test_bad_input():
    model = _qwen25vl()
    with pytest.raises(TypeError, match="segment_names"):
        AttentionPolicy(model, segment_names="image")
    with pytest.raises(ValueError, match="segment_names"):
        AttentionPolicy(model, segment_names=("a", "a"))
    with pytest.raises(TypeError, match="stats"):
        AttentionPolicy(model, stats=1)
    text = AttentionPolicy(_qwen2())
    with pytest.raises(ValueError, match="key_segments"):
        with text.observe(key_segments=torch.zeros(1, 4, dtype=torch.long)):
            pass
    policy = AttentionPolicy(model, backend="reference")
    with pytest.raises(TypeError, match="key_segments"):
        with policy.observe(key_segments=torch.zeros(1, 4)):
            pass
    with pytest.raises(ValueError, match="key_segments"):
        with policy.observe(key_segments=torch.zeros(4, dtype=torch.long)):
            pass
    ids = torch.randint(0, 50, (1, 6))
    with pytest.raises(ValueError, match="key_segments"):                 # wrong length
        with torch.no_grad(), policy.observe(key_segments=torch.zeros(1, 5, dtype=torch.long)):
            model(input_ids=ids)
    with pytest.raises(ValueError, match="key_segments"):                 # id out of range
        with torch.no_grad(), policy.observe(key_segments=torch.full((1, 6), 3)):
            model(input_ids=ids)
    entropy, mass, mask = torch.rand(2, 6), torch.rand(2, 6, 3), torch.ones(2, 4)
    with pytest.raises(ValueError, match="mass"):
        attention_stats_loss(entropy, None, mask, mass_coef=1.0)
    with pytest.raises(ValueError, match="segments"):
        attention_stats_loss(entropy, mass, mask, mass_coef=1.0, segments=(3,))
    with pytest.raises(ValueError, match="entropy"):
        attention_stats_loss(torch.rand(2, 3), mass, mask, entropy_coef=1.0)
    with pytest.raises(ValueError, match="entropy_coef"):
        attention_stats_loss(entropy, mass, mask)
