"""ral.losses against straightforward per-element formulas."""

import math

import pytest
import torch

from ral.losses import (attention_policy_loss, group_advantages, grpo_token_loss, k3_kl, reduce_tokens)


def _data(seed=0, b=4, t=5):
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    old = logps + 0.4 * torch.randn(b, t, generator=g, dtype=torch.float64)
    ref = logps + 0.3 * torch.randn(b, t, generator=g, dtype=torch.float64)
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    mask = torch.ones(b, t)
    mask[0, 3:] = 0
    mask[2, 1:] = 0
    return logps, old, ref, adv, mask


def _loops(logps, old, ref, adv, mask, beta, lo, hi, loss_type, max_len=None):
    b, t = logps.shape
    per = [[0.0] * t for _ in range(b)]
    for i in range(b):
        for j in range(t):
            r = math.exp(logps[i, j] - old[i, j])
            a = float(adv[i])
            v = -min(r * a, min(max(r, 1 - lo), 1 + hi) * a)
            d = float(ref[i, j] - logps[i, j])
            v += beta * (math.exp(d) - d - 1)
            per[i][j] = v * float(mask[i, j])
    if loss_type == "grpo":
        return sum(sum(per[i]) / max(float(mask[i].sum()), 1) for i in range(b)) / b
    total = sum(map(sum, per))
    if loss_type == "bnpo":
        return total / float(mask.sum())
    return total / (b * (max_len or t))


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_loss_matches_loops(loss_type, beta):
    logps, old, ref, adv, mask = _data()
    res = grpo_token_loss(logps, old, adv, mask, ref_logps=ref, beta=beta, epsilon_low=0.2, epsilon_high=0.28,
                          loss_type=loss_type, max_completion_length=8 if loss_type == "dr_grpo" else None)
    want = _loops(logps, old, ref, adv, mask, beta, 0.2, 0.28, loss_type, 8 if loss_type == "dr_grpo" else None)
    assert abs(float(res.loss) - want) < 1e-10
    assert (res.kl is None) == (beta == 0)
    # the same advantages given per token (B, T); a (B, 1) would have broadcast to (B, B, T)
    per_token = grpo_token_loss(logps, old, adv[:, None].expand(mask.shape), mask, ref_logps=ref, beta=beta,
                                epsilon_low=0.2, epsilon_high=0.28, loss_type=loss_type,
                                max_completion_length=8 if loss_type == "dr_grpo" else None)
    assert abs(float(per_token.loss) - want) < 1e-10
    with pytest.raises(ValueError, match="advantages: expected"):
        grpo_token_loss(logps, old, adv[:, None], mask, ref_logps=ref, beta=beta)
    # old / reference log-probs of another shape broadcast into a loss of other tokens; negative
    # clipping bounds or beta trained against the surrogate: refused
    for kw, message in ((dict(old_logps=old[:, :1]), "old_logps: shape"), (dict(ref_logps=ref[:1]), "ref_logps: shape"),
                        (dict(epsilon_low=-0.2), "epsilon_low must be a finite float >= 0"),
                        (dict(epsilon_high=float("nan")), "epsilon_high must be"), (dict(beta=-1.0), "beta must be")):
        args = {"old_logps": old, "ref_logps": ref, "beta": 0.04, "epsilon_low": 0.2, **kw}
        with pytest.raises(ValueError, match=message):
            grpo_token_loss(logps, args.pop("old_logps"), adv, mask, **args)


def test_grpo_gradient_and_ratio_one():
    logps, _, _, adv, mask = _data(1)
    logps = logps.clone().requires_grad_(True)
    res = grpo_token_loss(logps, None, adv, mask, loss_type="bnpo")     # old = logps: ratio 1
    res.loss.backward()
    # d/dlogp of -r*A at r = 1 is -A; bnpo divides by the token count
    want = -adv[:, None] * mask / mask.sum()
    torch.testing.assert_close(logps.grad, want.to(logps.dtype))
    assert float(res.clip_ratio) == 0.0


def test_clipping_stops_gradient():
    logps = torch.zeros(2, 1, dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[-1.0], [1.0]], dtype=torch.float64)     # ratios e and 1/e
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)           # both clipped on their side
    res = grpo_token_loss(logps, old, adv, torch.ones(2, 1), epsilon_low=0.2, epsilon_high=0.2)
    res.loss.backward()
    assert float(logps.grad.abs().max()) == 0.0
    assert float(res.clip_ratio) == 1.0


def test_dapo_uses_num_items():
    per = torch.arange(6.0).view(2, 3)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert float(reduce_tokens(per, mask, "dapo", num_items=10)) == pytest.approx((0 + 1 + 3 + 4 + 5) / 10)
    assert float(reduce_tokens(per, mask, "dapo")) == pytest.approx(13 / 5)
    for bad in (mask[:, :1], mask[:1], mask.flatten()):    # each broadcast against (2, 3) without a word
        with pytest.raises(ValueError, match=r"mask: shape .* must equal the \(B, T\) per-token values'"):
            reduce_tokens(per, bad, "grpo")
    with pytest.raises(ValueError):
        reduce_tokens(per, mask, "sum")


def test_k3_and_advantages():
    lp, rf = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    torch.testing.assert_close(k3_kl(lp, rf), torch.exp(rf - lp) - (rf - lp) - 1)
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    adv = group_advantages(r, 3)
    g1 = torch.tensor([1.0, 0.0, 0.0])
    torch.testing.assert_close(adv[:3], (g1 - g1.mean()) / (g1.std() + 1e-4))
    assert float(adv[3:].abs().max()) == 0.0        # all-equal group: no signal
    torch.testing.assert_close(group_advantages(r, 3, scale=False)[:3], g1 - g1.mean())
    with pytest.raises(ValueError):
        group_advantages(r, 4)
    with pytest.raises(ValueError, match="group_size must be an int >= 1"):
        group_advantages(r, 0)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo"])
def test_attention_policy_loss(loss_type):
    g = torch.Generator().manual_seed(3)
    div = torch.rand(3, 6, generator=g) * math.log(2)
    adv = torch.tensor([1.0, -0.5, 2.0])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    got = attention_policy_loss(div, adv, mask, loss_type=loss_type)     # div (B, S) right-aligned to T=4
    d = div[:, 2:]
    if loss_type == "grpo":
        want = sum(float((adv[i] * d[i] * mask[i]).sum() / mask[i].sum()) for i in range(3)) / 3
    elif loss_type == "bnpo":
        want = float((adv[:, None] * d * mask).sum() / mask.sum())
    else:
        want = float((adv[:, None] * d * mask).sum() / (3 * 4))
    assert float(got) == pytest.approx(want, rel=1e-6)
    # no advantages: the distillation term
    assert float(attention_policy_loss(d, None, mask, "bnpo")) == pytest.approx(float((d * mask).sum() / mask.sum()))
    # sign: A > 0 -> minimising pulls div down
    dd = d.clone().requires_grad_(True)
    attention_policy_loss(dd, adv, mask, "bnpo").backward()
    assert bool((dd.grad[0, :3] > 0).all()) and bool((dd.grad[1, :1] < 0).all())
    # per-token advantages (veRL's layout) weigh each token; the (B,) ones broadcast over T
    per_token = adv[:, None].expand(3, 4) * torch.tensor([1.0, 0.5, 2.0, 1.0])
    assert float(attention_policy_loss(div, per_token, mask, loss_type)) == pytest.approx(
        float(attention_policy_loss(div * torch.tensor([1.0, 1.0, 1.0, 0.5, 2.0, 1.0]), adv, mask, loss_type)), rel=1e-6)
    # shapes that broadcast to something else (advantages (B, 1) made a (B, B, T) product) are refused
    for bad in (adv[:, None], adv[:2], torch.ones(3, 6)):
        with pytest.raises(ValueError, match="advantages: expected"):
            attention_policy_loss(div, bad, mask, loss_type)
    with pytest.raises(ValueError, match="must be 2-D with the same B"):
        attention_policy_loss(div[:, None], adv, mask, loss_type)
