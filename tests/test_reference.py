"""The oracle itself: ral.reference against an independent float64 formulation (the paper's
recipe, row by row, in probability space), autograd gradcheck, and the gradient formula of docs/design.md ("Gradient") that every kernel implements, checked against autograd."""

import math

import pytest
import torch

from oracle import Problem, option_grid, option_id
from ral import reference


def paper_recipe(q, k, v, q_ref, k_ref, *, divergence="jsd", heads="mean", exclude_self=True,
                 causal=True, scale=None, ref_scale=None, key_padding_mask=None, row_mask=None, **_):
    """Row by row in probability space: softmax over the attended keys, average heads (or not),
    drop self, renormalise, divergence. Returns out (B,H,Sq,Dv) and div."""
    batch, n_heads, q_len, dim = q.shape
    k_len = k.shape[2]
    scale = scale or 1 / math.sqrt(dim)
    ref_scale = ref_scale or 1 / math.sqrt(q_ref.shape[-1])
    out = torch.zeros(batch, n_heads, q_len, v.shape[-1], dtype=torch.float64)
    div = torch.zeros((batch, n_heads, q_len) if heads == "each" else (batch, q_len), dtype=torch.float64)

    def probs(qq, kk, b, i, s, keys):
        group = qq.shape[1] // kk.shape[1]
        rows = []
        for h in range(qq.shape[1]):
            logits = s * (kk[b, h // group] @ qq[b, h, i])
            p = torch.zeros(k_len, dtype=torch.float64)
            if keys:
                p[keys] = torch.softmax(logits[keys], 0)
            rows.append(p)
        return torch.stack(rows)  # (heads, Sk)

    def f(pi, rho):
        pos = (pi > 0) | (rho > 0)
        pi, rho = pi[pos], rho[pos]
        if divergence == "kl":
            return (pi * torch.log(pi / rho)).sum()
        if divergence == "reverse_kl":
            return (rho * torch.log(rho / pi)).sum()
        mid = (pi + rho) / 2
        return 0.5 * (pi * torch.log(pi / mid)).nan_to_num().sum() + 0.5 * (rho * torch.log(rho / mid)).nan_to_num().sum()

    for b in range(batch):
        for i in range(q_len):
            pos = k_len - q_len + i
            keys = [j for j in range(k_len) if (key_padding_mask is None or key_padding_mask[b, j])
                    and (not causal or j <= pos)]
            support = [j for j in keys if not (exclude_self and j == pos)]
            a = probs(q, k, b, i, scale, keys)
            group = n_heads // v.shape[1]
            out[b, :, i] = torch.stack([a[h] @ v[b, h // group] for h in range(n_heads)])
            if not support or (row_mask is not None and not row_mask[b, i]):
                continue
            r = probs(q_ref, k_ref, b, i, ref_scale, keys)
            if heads == "mean":
                pi, rho = a.mean(0)[support], r.mean(0)[support]
                div[b, i] = f(pi / pi.sum(), rho / rho.sum())
            else:
                for h in range(n_heads):
                    pi, rho = a[h, support], r[h, support]
                    div[b, h, i] = f(pi / pi.sum(), rho / rho.sum())
    return out, div


@pytest.mark.parametrize("opts", list(option_grid()), ids=option_id)
def test_reference_matches_paper_recipe(opts):
    problem = Problem(batch=2, heads=4, kv_heads=2, q_len=6, k_len=9, head_dim=8, v_head_dim=5,
                      left_pad=(0, 3), row_mask=True, seed=3, options=opts)
    if opts["heads"] == "mean":
        problem.ref_heads, problem.ref_kv_heads, problem.ref_head_dim = 3, 1, 6
    kw = problem.make()
    res = reference.attention_kl(**kw)
    out, div = paper_recipe(**kw)
    torch.testing.assert_close(res.out, out, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(res.div, div, rtol=1e-9, atol=1e-12)


def test_stats_are_the_two_log_normalisers():
    kw = Problem(q_len=5, k_len=7, left_pad=(2, 0), seed=1).make()
    stats = reference.attention_kl(**kw).stats
    scores = reference.head_scores(kw["q"], kw["k"], 1 / math.sqrt(kw["q"].shape[-1]))
    b, h, i = 0, 1, 4
    pos = 7 - 5 + i
    attended = [j for j in range(2, 7) if j <= pos]
    support = [j for j in attended if j != pos]
    assert stats[b, h, i, 0] == pytest.approx(float(torch.logsumexp(scores[b, h, i, attended], 0)), rel=1e-12)
    assert stats[b, h, i, 1] == pytest.approx(float(torch.logsumexp(scores[b, h, i, support], 0)), rel=1e-12)


def test_edge_rows_are_zero_not_nan():
    # batch 1 is padded everywhere but its last key: its rows have an empty A or an empty P
    kw = Problem(batch=2, q_len=4, k_len=4, left_pad=(0, 3), seed=2).make()
    for key in ("q", "k", "v"):
        kw[key].requires_grad_(True)
    res = reference.attention_kl(**kw)
    (res.out.sum() + res.div.sum()).backward()
    assert torch.isneginf(res.stats[1, :, :3, 0]).all() and torch.isneginf(res.stats[1, :, :, 1]).all()
    assert (res.out[1, :, :3] == 0).all() and (res.div[1] == 0).all() and res.div[0, 0] == 0
    for key in ("q", "k", "v"):
        assert torch.isfinite(kw[key].grad).all()
    assert (kw["q"].grad[1, :, :3] == 0).all()


def test_identical_models_have_zero_divergence_and_jsd_is_bounded():
    kw = Problem(q_len=9, k_len=12, seed=4).make()
    same = reference.attention_kl(**{**kw, "q_ref": kw["q"], "k_ref": kw["k"]})
    assert same.div.abs().max() < 1e-12
    far = reference.attention_kl(**{**kw, "q_ref": 30 * kw["q_ref"]})
    assert (far.div >= 0).all() and (far.div <= math.log(2) + 1e-12).all()


@pytest.mark.parametrize("opts", [dict(divergence="jsd", heads="mean"), dict(divergence="kl", heads="each"),
                                  dict(divergence="reverse_kl", heads="mean", causal=False),
                                  dict(divergence="jsd", heads="each", exclude_self=False)], ids=str)
def test_gradcheck(opts):
    kw = Problem(batch=1, heads=2, kv_heads=1, q_len=3, k_len=4, head_dim=3, v_head_dim=2, left_pad=(1,),
                 row_mask=False, seed=5, options=opts).make()
    names = ("q", "k", "v")

    def fn(q, k, v):
        res = reference.attention_kl(q, k, v, **{key: val for key, val in kw.items() if key not in names})
        return res.out, res.div

    assert torch.autograd.gradcheck(fn, tuple(kw[n].requires_grad_(True) for n in names), eps=1e-6, atol=1e-7)


def spec_score_gradient(kw, w):
    """dS of docs/design.md, "Gradient", for the divergence alone (upstream gradient w of div):
    mean: dS[h,i,k] = w (a/H)(G_k - c_h); each: dS = w a G^h_k. Returns (B, H, Sq, Sk)."""
    q, k, q_ref, k_ref = kw["q"], kw["k"], kw["q_ref"], kw["k_ref"]
    heads = kw.get("heads", "mean")
    batch, n_heads, q_len, dim = q.shape
    attended, support = reference.key_sets(batch, q_len, k.shape[2], causal=kw.get("causal", True),
                                           exclude_self=kw.get("exclude_self", True),
                                           key_padding_mask=kw.get("key_padding_mask"), device=q.device)
    scores = reference.head_scores(q, k, 1 / math.sqrt(dim))
    stats = reference.row_stats(scores, attended, support)
    ref_scores = reference.head_scores(q_ref, k_ref, 1 / math.sqrt(q_ref.shape[-1]))
    log_rho = reference.log_policy(ref_scores, reference.row_stats(ref_scores, attended, support), attended,
                                   support, heads)
    log_pi = reference.log_policy(scores, stats, attended, support, heads)
    a = torch.where(attended[:, None], torch.exp(scores - stats[..., :1]), torch.zeros_like(scores))
    pi = torch.exp(log_pi)
    keep = support if heads == "mean" else support[:, None]
    if kw["divergence"] == "kl":
        g = log_pi - log_rho + 1
    elif kw["divergence"] == "reverse_kl":
        g = -torch.exp(log_rho - log_pi)
    else:
        g = 0.5 * (log_pi - (torch.logaddexp(log_pi, log_rho) - math.log(2)))
    g = torch.where(keep, g, torch.zeros_like(g))
    gbar = (torch.where(keep, pi, torch.zeros_like(pi)) * g).sum(-1, keepdim=True)
    if heads == "mean":
        z = torch.exp(stats[..., 1] - stats[..., 0]).mean(1)[..., None]          # (B, Sq, 1)
        G = torch.where(support, (g - gbar) / z, torch.zeros_like(g))          # (B, Sq, Sk)
        c = (a * G[:, None]).sum(-1, keepdim=True)                              # (B, H, Sq, 1)
        # the form the kernels store: c_h = (u_h - gbar Z_h) / Z, u_h = sum_P a_hj g_j
        u = (a * torch.where(support[:, None], g[:, None], torch.zeros_like(a))).sum(-1, keepdim=True)
        z_h = torch.exp(stats[..., 1:] - stats[..., :1])
        rows = support.any(-1)[:, None, :, None].expand_as(c)  # rows with a non-empty P
        torch.testing.assert_close(c[rows], ((u - gbar[:, None] * z_h) / z[:, None])[rows], rtol=1e-9, atol=1e-12)
        return w[:, None, :, None] * a / n_heads * (G[:, None] - c) * attended[:, None]
    z = torch.exp(stats[..., 1] - stats[..., 0])[..., None]
    G = torch.where(keep, (g - gbar) / z, torch.zeros_like(g))
    return w[..., None] * a * G


@pytest.mark.parametrize("opts", list(option_grid()), ids=option_id)
def test_spec_gradient_formula_matches_autograd(opts):
    problem = Problem(batch=2, heads=4, kv_heads=2, q_len=5, k_len=7, head_dim=6, v_head_dim=None,
                      left_pad=(0, 2), seed=7, options=opts)
    if opts["heads"] == "mean":
        problem.ref_heads, problem.ref_head_dim = 2, 5
    kw = problem.make()
    q, k = kw["q"].requires_grad_(True), kw["k"].requires_grad_(True)
    div = reference.attention_kl(**kw).div
    w = torch.randn(div.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    dq, dk = torch.autograd.grad((div * w).sum(), (q, k))
    ds = spec_score_gradient({key: (t.detach() if torch.is_tensor(t) else t) for key, t in kw.items()}, w)
    scale = 1 / math.sqrt(q.shape[-1])
    group = q.shape[1] // k.shape[1]
    k_rep = k.detach().repeat_interleave(group, 1)
    torch.testing.assert_close(dq, scale * ds @ k_rep, rtol=1e-8, atol=1e-10)
    dk_rep = scale * ds.transpose(-1, -2) @ q.detach()
    torch.testing.assert_close(dk, dk_rep.unflatten(1, (k.shape[1], group)).sum(2), rtol=1e-8, atol=1e-10)


def test_random_campaign_runs_and_sorts_failures(capsys):
    """tests/random_campaign.py end to end on the reference backend (its own peer in the dtype, so every
    problem passes), then its sorting of accuracy failures into KINDS."""
    import random_campaign as campaign
    from oracle import AccuracyError

    threads = torch.get_num_threads()
    try:
        assert campaign.main(["reference", "--seconds", "1", "--threads", str(threads)]) == 0
    finally:
        torch.set_num_threads(threads)
    assert " 0 failed" in capsys.readouterr().out
    with_v, without_v = Problem(v_head_dim=16), Problem(v_head_dim=None)
    peaked = Problem(v_head_dim=None, options=dict(scale=2.0))
    cases = [(("dq", 1e-3, 1e-4, 1e-5, 1e-7), with_v, "exact zero"),
             (("dk", 1e-3, float("nan"), float("nan"), 1.0), with_v, "PyTorch non-finite"),
             (("dq", 1e-3, 1e-4, 1e-5, 1.0), with_v, "dq / dk with v"),
             (("dq", 1e-3, 1e-4, 1e-5, 1.0), without_v, "other"),
             (("div", 3e-7, 1e-7, 1e-8, 1e-3), without_v, "div below 1e-6"),
             (("dk", 1e-5, 4e-6, 1e-6, 0.3), peaked, "stored lse, peaked"),
             (("div", 1e-5, 4e-6, 1e-6, 0.3), peaked, "other"),
             (("dk", 1e-3, 4e-4, 1e-4, 0.3), Problem(v_head_dim=None, dtype=torch.float16,
                                                     options=dict(scale=2.0)), "other"),
             (("out", 1e-3, 1e-4, 1e-5, 1.0), with_v, "other")]
    for args, problem, want in cases:
        assert campaign.kind(AccuracyError("", *args), problem) == want, (args, want)
    assert campaign.kind(AssertionError("NaN pattern"), with_v) == "other"
