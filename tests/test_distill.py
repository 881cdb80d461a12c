"""On-policy attention distillation (ral.integrations.distill, ral.lm_head): the chunked reverse KL against the plain full
computation (value and gradient), its memory (no N x V tensor is ever created), the attention term
against the reference op and against the paper's recipe from eager attention weights."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ral import reference
from oracle import attention_distill_div, reverse_kl_full
from ral.integrations.distill import DistillConfig, distill_loss, teacher_pass
from ral.integrations.models import lm_head_params
from ral.lm_head import chunked_reverse_kl, chunked_token_logps
from ral.losses import masked_token_mean


def _problem(n=37, ds=16, dt=24, v=50, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(n, ds, generator=g, dtype=dtype).requires_grad_()
    ws = (torch.randn(v, ds, generator=g, dtype=dtype) / 2).requires_grad_()
    bs = torch.randn(v, generator=g, dtype=dtype).requires_grad_()
    ht = torch.randn(n, dt, generator=g, dtype=dtype)
    wt = torch.randn(v, dt, generator=g, dtype=dtype) / 2
    bt = torch.randn(v, generator=g, dtype=dtype)
    return hs, ws, bs, ht, wt, bt


@pytest.mark.parametrize("chunk", [1, 8, 37, 1000])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_reverse_kl_matches_full(chunk, temperature):
    hs, ws, bs, ht, wt, bt = _problem()
    kw = dict(b_student=bs, b_teacher=bt, temperature=temperature)
    got = chunked_reverse_kl(hs, ws, ht, wt, chunk_size=chunk, **kw)
    want = reverse_kl_full(hs, ws, ht, wt, **kw)
    # independent formula: sum_v p_s (log p_s - log p_t)
    ls = torch.log_softmax((hs @ ws.T + bs) / temperature, -1)
    lt = torch.log_softmax((ht @ wt.T + bt) / temperature, -1)
    assert torch.allclose(want, (ls.exp() * (ls - lt)).sum(-1), atol=1e-12)
    assert torch.allclose(got, want, atol=1e-12, rtol=1e-10)
    assert (got >= -1e-12).all()
    w = torch.randn(got.shape, dtype=got.dtype)
    g_got = torch.autograd.grad((got * w).sum(), (hs, ws, bs))
    g_want = torch.autograd.grad((want * w).sum(), (hs, ws, bs))
    for a, b in zip(g_got, g_want):
        assert torch.allclose(a, b, atol=1e-11, rtol=1e-9)


def test_chunked_reverse_kl_gradcheck_and_fp32():
    hs, ws, bs, ht, wt, bt = _problem(n=5, ds=3, dt=4, v=7)
    assert torch.autograd.gradcheck(
        lambda h, w, b: chunked_reverse_kl(h, w, ht, wt, b_student=b, b_teacher=bt, chunk_size=2), (hs, ws, bs))
    h32, w32, b32, ht32, wt32, bt32 = _problem(dtype=torch.float32)
    got = chunked_reverse_kl(h32, w32, ht32, wt32, b_student=b32, b_teacher=bt32, chunk_size=8)
    assert got.dtype == torch.float32
    want = reverse_kl_full(h32.double(), w32.double(), ht32.double(), wt32.double(), b_student=b32.double(),
                           b_teacher=bt32.double())
    assert torch.allclose(got.double(), want, atol=1e-5)
    # identical teacher and student: KL = 0 and zero gradient
    same = chunked_reverse_kl(h32, w32, h32.detach(), w32.detach(), chunk_size=8)
    assert same.abs().max() < 1e-5


def test_chunked_reverse_kl_checks():
    hs, ws, bs, ht, wt, bt = _problem()
    with pytest.raises(ValueError, match="vocabulary"):
        chunked_reverse_kl(hs, ws, ht, wt[:-1])
    with pytest.raises(ValueError, match="N must match"):
        chunked_reverse_kl(hs, ws, ht[:-1], wt)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_reverse_kl(hs, ws, ht, wt, chunk_size=0)
    # temperature 0 gave NaN, a negative one the KL of flipped distributions; chunk_size 0 in the token
    # log-probs raised range()'s error, targets of another length a shape error deep in gather
    for kw, message in ((dict(temperature=0.0), "temperature must be a finite float > 0"),
                        (dict(temperature=-1.0), "temperature must be"), (dict(chunk_size=True), "chunk_size")):
        with pytest.raises(ValueError, match=message):
            chunked_reverse_kl(hs, ws, ht, wt, **kw)
    targets = torch.zeros(hs.shape[0], dtype=torch.long)
    for kw, message in ((dict(chunk_size=0), "chunk_size must be an int >= 1"),
                        (dict(temperature=0.0), "temperature must be"),
                        (dict(targets=targets[:-1]), r"targets: expected \(N,\)")):
        args = {"targets": targets, **kw}
        with pytest.raises(ValueError, match=message):
            chunked_token_logps(hs, ws, args.pop("targets"), **args)


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op produces (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest, self.shape = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.numel() > self.largest:
                self.largest, self.shape = t.numel(), tuple(t.shape)
        return out


def test_chunked_reverse_kl_never_creates_n_by_v():
    """Argument-level memory check: with N = 2 x 3 x 64 rows (B x S tokens) and V = 4096, no op in the
    forward or the backward produces a tensor as large as N x V; the largest is the chunk x V scratch
    or the V x D weight gradient."""
    n, d, v, chunk = 2 * 3 * 64, 16, 4096, 32
    hs = torch.randn(n, d, requires_grad=True)
    ws = torch.randn(v, d, requires_grad=True)
    ht, wt = torch.randn(n, 24), torch.randn(v, 24)
    with _LargestTensor() as mode:
        kl = chunked_reverse_kl(hs, ws, ht, wt, chunk_size=chunk)
        kl.sum().backward()
    assert mode.largest <= max(chunk * v, v * 24), mode.shape
    assert mode.largest < n * v // 4
    with _LargestTensor() as full:
        reverse_kl_full(hs, ws, ht, wt).sum().backward()
    assert full.largest >= n * v          # the oracle does materialise it: the check has teeth

    # the same for the chunked token log-probs used by the RL term
    targets = torch.randint(0, v, (n,))
    with _LargestTensor() as mode:
        chunked_token_logps(hs, ws, targets, chunk_size=chunk).sum().backward()
    assert mode.largest <= max(chunk * v, v * d), mode.shape


@pytest.mark.parametrize("padding", [False, True])
def test_attention_term_against_reference(padding):
    """Student H=4, Hkv=2, D=8; teacher H=6, Hkv=3, D=16 (heads="mean")."""
    g = torch.Generator().manual_seed(1)
    b, s = 2, 9
    q = torch.randn(b, 4, s, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, 2, s, 8, generator=g, dtype=torch.float64, requires_grad=True)
    qt = torch.randn(b, 6, s, 16, generator=g, dtype=torch.float64)
    kt = torch.randn(b, 3, s, 16, generator=g, dtype=torch.float64)
    kpm = torch.ones(b, s, dtype=torch.bool)
    if padding:
        kpm[0, :3] = False
    rows = torch.zeros(b, s, dtype=torch.bool)
    rows[:, 5:] = True
    got = attention_distill_div(q.float(), k.float(), q_teacher=qt.float(), k_teacher=kt.float(),
                                key_padding_mask=kpm, row_mask=rows).div
    want = reference.attention_kl(q, k, None, q_ref=qt, k_ref=kt, divergence="jsd", heads="mean",
                                  key_padding_mask=kpm, row_mask=rows).div
    assert torch.allclose(got.double(), want, atol=1e-5)
    assert (got[~rows] == 0).all() and (got[rows] > 0).all() and (got <= math.log(2) + 1e-6).all()
    gq, gk = torch.autograd.grad(want.sum(), (q, k))
    q32, k32 = q.detach().float().requires_grad_(), k.detach().float().requires_grad_()
    div = attention_distill_div(q32, k32, q_teacher=qt.float(), k_teacher=kt.float(), key_padding_mask=kpm,
                                row_mask=rows).div
    dq, dk = torch.autograd.grad(div.sum(), (q32, k32))
    assert torch.allclose(dq.double(), gq, atol=1e-5) and torch.allclose(dk.double(), gk, atol=1e-5)


def test_config_and_reductions():
    assert DistillConfig.kd().gamma_attn == 0 and DistillConfig.kd().mu == 1
    assert not DistillConfig(mu=0, gamma_attn=0).needs_teacher
    for bad in (dict(mu=-1), dict(gamma_attn=float("nan")), dict(chunk_size=0), dict(norm="x")):
        with pytest.raises(ValueError):
            DistillConfig(**bad)
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    m = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    assert masked_token_mean(x, m, "token").item() == pytest.approx(10 / 4)
    assert masked_token_mean(x, m, "sequence").item() == pytest.approx((2 + 4) / 2)
    assert masked_token_mean(x, m, "sum").item() == pytest.approx(10)


# ------------------------------------------------------------------------------------------------
# Model level: tiny Qwen2 student and teacher with different heads / kv heads / head dims.
# ------------------------------------------------------------------------------------------------

def _qwen2(hidden, heads, kv, layers, seed, attn="sdpa"):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(vocab_size=61, hidden_size=hidden, intermediate_size=2 * hidden,
                                   num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                                   max_position_embeddings=64, attn_implementation=attn)
    model = transformers.Qwen2ForCausalLM(cfg)
    # a sharper random attention than the default init, so the divergences are not ~0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "q_proj.weight" in name or "k_proj.weight" in name:
                p.mul_(8)
    return model


def _batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 61, (3, 12), generator=g)
    am = torch.ones(3, 12, dtype=torch.long)
    am[0, :3] = 0                      # left padding
    resp = torch.zeros(3, 12, dtype=torch.bool)
    resp[:, 7:] = True
    resp[2, 10:] = False               # a shorter response
    am[2, 10:] = 0                     # right padding after it
    return ids, am, resp


def _eager_policy(model, ids, am):
    """The paper's recipe from eager weights: last layer, heads averaged, self dropped, renormalised."""
    model.set_attn_implementation("eager")
    try:
        out = model(input_ids=ids, attention_mask=am, output_attentions=True, output_hidden_states=True)
    finally:
        model.set_attn_implementation("sdpa")
    a = out.attentions[-1].double().mean(1)                       # (B, S, S)
    eye = torch.eye(a.shape[-1], dtype=torch.bool)
    a = a.masked_fill(eye, 0.0)
    return a / a.sum(-1, keepdim=True).clamp_min(1e-300), out.logits


def test_distill_loss_against_materialised_recipe():
    from ral.integrations.transformers import AttentionPolicy
    student = _qwen2(32, 4, 2, 2, seed=0)
    teacher = _qwen2(48, 3, 1, 3, seed=1)      # 3 heads, 1 kv head, head dim 16 (student: 4, 2, 8)
    ids, am, resp = _batch()
    with torch.no_grad():
        pi_t, logits_t = _eager_policy(teacher, ids, am)
        pi_s, logits_s = _eager_policy(student, ids, am)

    # expected terms, fully materialised
    pred = resp[:, 1:]
    ls = torch.log_softmax(logits_s[:, :-1].double(), -1)
    lt = torch.log_softmax(logits_t[:, :-1].double(), -1)
    token_kl = (ls.exp() * (ls - lt)).sum(-1)[pred].mean()
    m = 0.5 * (pi_s + pi_t)

    def xlogy(x, y):
        return x * (torch.log(x.clamp_min(1e-200)) - torch.log(y.clamp_min(1e-200)))   # NaN-free gradient
    jsd = (0.5 * xlogy(pi_s, m) + 0.5 * xlogy(pi_t, m)).sum(-1)
    attn_jsd = jsd[resp].mean()
    logp = ls.gather(-1, ids[:, 1:, None]).squeeze(-1)
    rl = -(logp * pred).sum() / pred.sum()

    ps, pt = AttentionPolicy(student), AttentionPolicy(teacher)
    cfg = DistillConfig(mu=0.5, gamma_attn=2.0, lambda_rl=1.0, chunk_size=4)
    tout = teacher_pass(teacher, ids, am, resp, cfg, teacher_policy=pt)
    assert tout.hidden.shape == (int(pred.sum()), 48)
    assert tout.reference.layers[0].q.shape[1:] == (3, 12, 16)

    def rl_fn(lp):
        return -(lp * pred).sum() / pred.sum()
    loss, metrics = distill_loss(student, tout, ids, am, resp, cfg, student_policy=ps,
                                 teacher_head=lm_head_params(teacher), rl_loss_fn=rl_fn)
    assert metrics["token_kl"] == pytest.approx(token_kl.item(), rel=1e-4, abs=1e-6)
    assert metrics["attn_jsd"] == pytest.approx(attn_jsd.item(), rel=1e-4, abs=1e-6)
    assert metrics["loss_rl"] == pytest.approx(rl.item(), rel=1e-5)
    assert attn_jsd.item() > 1e-3 and token_kl.item() > 1e-3
    assert loss.item() == pytest.approx(rl.item() + 0.5 * token_kl.item() + 2.0 * attn_jsd.item(), rel=1e-4)

    # gradient of the whole loss against autograd through the eager recipe
    loss.backward()
    got = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad()
    student.set_attn_implementation("eager")
    out = student(input_ids=ids, attention_mask=am, output_attentions=True)
    student.set_attn_implementation("ral")
    ls = torch.log_softmax(out.logits[:, :-1].double(), -1)
    a = out.attentions[-1].double().mean(1).masked_fill(torch.eye(12, dtype=torch.bool), 0.0)
    a = a / a.sum(-1, keepdim=True).clamp_min(1e-300)
    m = 0.5 * (a + pi_t)
    jsd = (0.5 * xlogy(a, m) + 0.5 * xlogy(pi_t, m)).sum(-1)
    want_loss = (-(ls.gather(-1, ids[:, 1:, None]).squeeze(-1) * pred).sum() / pred.sum()
                 + 0.5 * (ls.exp() * (ls - lt)).sum(-1)[pred].mean() + 2.0 * jsd[resp].mean())
    want_loss.backward()
    for n, p in student.named_parameters():
        assert torch.allclose(got[n], p.grad, atol=2e-5, rtol=1e-3), (n, (got[n] - p.grad).abs().max().item(), p.grad.abs().max().item())


def test_terms_switch_off():
    from ral.integrations.transformers import AttentionPolicy
    student = _qwen2(32, 4, 2, 2, seed=0)
    teacher = _qwen2(48, 6, 3, 2, seed=1)
    ids, am, resp = _batch()
    ps, pt = AttentionPolicy(student), AttentionPolicy(teacher)
    full = DistillConfig(mu=1.0, gamma_attn=1.0, lambda_rl=0.0)
    tout = teacher_pass(teacher, ids, am, resp, full, teacher_policy=pt)
    both, m_both = distill_loss(student, tout, ids, am, resp, full, student_policy=ps,
                                teacher_head=lm_head_params(teacher))
    kd_cfg = DistillConfig.kd(lambda_rl=0.0)
    kd_out = teacher_pass(teacher, ids, am, resp, kd_cfg)          # no policy needed, no reference kept
    assert kd_out.reference is None
    kd, m_kd = distill_loss(student, kd_out, ids, am, resp, kd_cfg, teacher_head=lm_head_params(teacher))
    attn_cfg = DistillConfig(mu=0.0, gamma_attn=1.0, lambda_rl=0.0)
    attn_out = teacher_pass(teacher, ids, am, resp, attn_cfg, teacher_policy=pt)
    assert attn_out.hidden is None
    attn, m_attn = distill_loss(student, attn_out, ids, am, resp, attn_cfg, student_policy=ps)
    assert math.isnan(m_kd["attn_jsd"]) and math.isnan(m_attn["token_kl"]) and math.isnan(m_both["loss_rl"])
    assert both.item() == pytest.approx(kd.item() + attn.item(), rel=1e-5)
    rl_only = DistillConfig(mu=0.0, gamma_attn=0.0)
    loss, m = distill_loss(student, None, ids, am, resp, rl_only, rl_loss_fn=lambda lp: lp.sum())
    assert math.isnan(m["token_kl"]) and not math.isnan(m["loss_rl"])
    with pytest.raises(ValueError, match="teacher_out"):
        distill_loss(student, None, ids, am, resp, kd_cfg, teacher_head=lm_head_params(teacher))
