"""zoomsearch (issue #15): the shared-prefix cancellation of RAL's term, the task, the row policy,
and the trainer's controls. Small shapes, one thread: a few seconds in all."""

import math

import pytest
import torch

from ral import reference
from ral.losses import attention_policy_loss, group_advantages
from ral.train.diagnostics import row_policy
from ral.train.tasks.zoomsearch import ANS, LOOK, ZoomSearchTask, ZoomTrainer, zoom_attention_metrics
from ral.train.trainer import TrainConfig, completion_mask

pytest.importorskip("transformers")

TOKEN_LEVEL = ("bnpo", "dr_grpo", "dapo")


def _group_qk(g=4, h=2, s=10, d=8, shared=6, seed=0):
    """q, k for a group of g sequences whose first ``shared`` positions are one shared prefix
    (leaf tensors q0, k0 of batch 1, expanded: as a model's rows on a shared prefix, the shared
    parameters get the sum of the per-sample gradients) and whose later positions differ."""
    gen = torch.Generator().manual_seed(seed)
    q0 = torch.randn(1, h, s, d, generator=gen, dtype=torch.float64, requires_grad=True)
    k0 = torch.randn(1, h, s, d, generator=gen, dtype=torch.float64, requires_grad=True)
    tail_q = torch.randn(g, h, s - shared, d, generator=gen, dtype=torch.float64)
    tail_k = torch.randn(g, h, s - shared, d, generator=gen, dtype=torch.float64)
    q = torch.cat([q0[:, :, :shared].expand(g, -1, -1, -1), q0[:, :, shared:] + tail_q], 2)
    k = torch.cat([k0[:, :, :shared].expand(g, -1, -1, -1), k0[:, :, shared:] + tail_k], 2)
    q_ref = (q + 0.8 * torch.randn(q.shape, generator=gen, dtype=torch.float64)).detach()
    k_ref = (k + 0.8 * torch.randn(k.shape, generator=gen, dtype=torch.float64)).detach()
    # the reference on the shared prefix is shared as well
    q_ref[:, :, :shared] = q_ref[:1, :, :shared]
    k_ref[:, :, :shared] = k_ref[:1, :, :shared]
    return q0, k0, q, k, q_ref, k_ref


@pytest.mark.parametrize("loss_type", TOKEN_LEVEL + ("grpo",))
def test_shared_prefix_rows_cancel(loss_type):
    """sum_i A_i * JSD_i = 0 at a row whose prefix the whole group shares (float64 oracle), and its
    gradient on the shared weights is 0; a row whose prefix differs gives a nonzero term. With
    equal response lengths this holds for "grpo" too; with unequal lengths "grpo"'s per-sequence
    normalisation breaks it (the next test)."""
    g, s, shared = 4, 10, 6
    q0, k0, q, k, q_ref, k_ref = _group_qk(g=g, s=s, shared=shared)
    div = reference.attention_kl(q, k, q_ref=q_ref, k_ref=k_ref).div             # (G, S) float64, differentiable
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.9, 0.1]), g).double()
    assert abs(float(adv.sum())) < 1e-6
    shared_row, own_row = shared - 1, s - 1                                      # last shared / a differing row
    assert torch.allclose(div[:, shared_row], div[:1, shared_row].expand(g), rtol=0, atol=0)
    assert float(div[0, shared_row].detach()) > 1e-3                                     # the divergence itself is not 0
    def loss_and_grad(row, advantages):
        mask = torch.zeros(g, s, dtype=torch.bool)
        mask[:, row] = True
        loss = attention_policy_loss(div, advantages, mask, loss_type=loss_type, max_completion_length=s)
        gq, gk = torch.autograd.grad(loss, (q0, k0), retain_graph=True)
        return abs(float(loss.detach())), math.sqrt(float(gq.pow(2).sum() + gk.pow(2).sum()))

    # attention_policy_loss reduces in float32: compare with the same loss under |A| (no cancellation)
    for row, cancels in ((shared_row, True), (own_row, False)):
        (loss, gnorm), (scale, gscale) = loss_and_grad(row, adv), loss_and_grad(row, adv.abs())
        assert scale > 1e-4 and gscale > 1e-4
        if cancels:
            assert loss < 1e-6 * scale and gnorm < 1e-6 * gscale, (row, loss, gnorm)
        else:
            assert loss > 1e-4 * scale and gnorm > 1e-2 * gscale, (row, loss, gnorm)


def test_grpo_length_normalisation_breaks_the_cancellation():
    """loss_type "grpo" divides each response by its own length: with unequal lengths the shared
    row's terms get unequal weights and no longer cancel; the token-level types still cancel."""
    g, s, shared = 4, 10, 6
    q0, k0, q, k, q_ref, k_ref = _group_qk(g=g, s=s, shared=shared, seed=1)
    div = reference.attention_kl(q, k, q_ref=q_ref, k_ref=k_ref).div
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.9, 0.1]), g).double()
    row = shared - 1
    lengths = torch.tensor([1, 4, 2, 3])                                         # rows row .. row+len-1
    full = torch.zeros(g, s, dtype=torch.bool)
    for i, n in enumerate(lengths):
        full[i, row:row + int(n)] = True
    only_row = torch.zeros_like(full)
    only_row[:, row] = True

    def shared_row_part(loss_type):
        # the shared row's contribution to the loss over the whole responses
        per_token = div * only_row
        return attention_policy_loss(per_token, adv, full, loss_type=loss_type, max_completion_length=s)

    for lt in TOKEN_LEVEL:
        assert abs(float(shared_row_part(lt).detach())) < 1e-8          # float32 reduction of terms ~1e-2
    assert abs(float(shared_row_part("grpo").detach())) > 1e-4


def _tiny(fmt, grid=4, seed=0):
    torch.manual_seed(seed)
    task = ZoomSearchTask(grid=grid, fmt=fmt, hidden_size=32, layers=2, intermediate_size=64)
    return task, task.build_model()


def test_task_prompts_and_reward():
    for grid in (0, 3, -4, 32, 8.0):
        with pytest.raises(ValueError, match="grid must be an even divisor of 16"):
            ZoomSearchTask(grid=grid)
    for fmt in ("zoom", "direct"):
        task = ZoomSearchTask(grid=8, fmt=fmt)
        p = task.sample(32, torch.Generator().manual_seed(3))
        assert p.input_ids.shape == (32, 64 + 5) and p.cell_features.shape == (32, 64, task.cfg.feature_dim)
        assert torch.equal(p.input_ids[:, 1:3], p.input_ids[:, -2:])          # the question, before and after
        assert (p.input_ids[:, 3:67] == 3).all()                                # the N <img> slots
        r, c = p.target_cell // 8, p.target_cell % 8
        assert torch.equal(p.region - 7, 2 * (r >= 4).long() + (c >= 4).long())
        good = task.sft_targets(p)
        out = task.reward(good, p)
        assert torch.equal(out["reward"], torch.ones(32)) and torch.equal(out["accuracy"], torch.ones(32))
        wrong = good.clone()
        a = 3 if fmt == "zoom" else 1
        wrong[:, a] = task.shape_token((wrong[:, a] - task.shape_token(0) + 1) % task.cfg.n_shapes)
        out = task.reward(wrong, p)
        assert torch.allclose(out["reward"], torch.full((32,), 0.1)) and out["accuracy"].sum() == 0
        assert task.rows()["ans"] == 69 + (2 if fmt == "zoom" else 0)
        assert torch.equal(task.target_positions(p), 3 + p.target_cell)
    # without noise every cell is background + position, or hue + tone + shape + position: decode
    # each cell and check the grid: the named colour once (the target, with the answer's shape),
    # the lures share its hue with another tone, N / 8 of them
    task = ZoomSearchTask(grid=16, feature_noise=0.0)
    c = task.cfg
    assert c.lures == 32
    p = task.sample(8, torch.Generator().manual_seed(4))
    r, q = torch.arange(256) // 16, torch.arange(256) % 16
    rest = p.cell_features - (task.row_codes[r] + task.col_codes[q])            # (B, N, F)
    codes = (task.hue_codes[:, None, None] + task.tone_codes[None, :, None] + task.shape_codes[None, None])
    codes = codes.reshape(-1, c.feature_dim)                                     # (hue, tone, shape)
    dist = torch.cdist(rest, codes, compute_mode="donot_use_mm_for_euclid_dist")
    is_obj = dist.min(-1).values < 1e-4
    assert ((rest - task.background).norm(dim=-1)[~is_obj] < 1e-4).all()
    assert torch.equal(is_obj.sum(1), torch.full((8,), c.n_objects + c.lures))
    which = dist.argmin(-1)
    hue, tone, shape = which // (c.n_tones * c.n_shapes), which // c.n_shapes % c.n_tones, which % c.n_shapes
    named = p.input_ids[:, -1] - task.colour_token(0)
    full = is_obj & (hue * c.n_tones + tone == named[:, None])
    assert torch.equal(full.sum(1), torch.ones(8, dtype=torch.long))
    assert torch.equal(full.float().argmax(1), p.target_cell)
    assert torch.equal(task.shape_token(shape[torch.arange(8), p.target_cell]), p.answer)
    lure = is_obj & (hue == (named // c.n_tones)[:, None]) & ~full
    assert (lure.sum(1) >= c.lures).all()


def test_row_policy_matches_dense_softmax():
    """row_policy against a plain dense softmax: causal, head mean, self dropped, renormalised."""
    gen = torch.Generator().manual_seed(0)
    b, h, hkv, s, d = 3, 4, 2, 9, 8
    q, k = torch.randn(b, h, s, d, generator=gen), torch.randn(b, hkv, s, d, generator=gen)
    row = 6
    kk = k.repeat_interleave(2, 1)
    att = torch.softmax(torch.einsum("bhd,bhjd->bhj", q[:, :, row], kk[:, :, :row + 1]) / 3.0, -1)
    each = att[..., :row] / att[..., :row].sum(-1, keepdim=True)
    mean = att.mean(1)[..., :row]
    mean = mean / mean.sum(-1, keepdim=True)
    pi, support = row_policy(q, k, 1 / 3.0, row)
    assert support[:, row].logical_not().all() and support[:, :row].all()
    torch.testing.assert_close(pi[:, :row], mean, rtol=1e-5, atol=1e-6)
    assert float(pi[:, row].abs().max()) == 0.0
    pe, _ = row_policy(q, k, 1 / 3.0, row, heads="each")
    torch.testing.assert_close(pe[..., :row], each, rtol=1e-5, atol=1e-6)


def test_row_policy_per_sample_rows_and_attention_metrics():
    """row_policy with one row per sample ((B,) rows, left padding) equals a dense masked softmax at
    those rows, and attention_metrics' entropy / target mass / uniform entropy are that policy's."""
    from types import SimpleNamespace
    from ral.train.diagnostics import attention_metrics
    gen = torch.Generator().manual_seed(1)
    b, h, hkv, s, d = 3, 4, 2, 11, 8
    q, k = torch.randn(b, h, s, d, generator=gen), torch.randn(b, hkv, s, d, generator=gen)
    kpm = torch.ones(b, s, dtype=torch.bool)
    kpm[1, :3] = False                                       # sample 1 left-padded by 3
    rows, targets = torch.tensor([10, 6, 4]), torch.tensor([2, 4, 0])
    kk = k.repeat_interleave(2, 1)
    want = torch.zeros(b, s, dtype=torch.float64)
    for i in range(b):
        r = int(rows[i])
        keys = kpm[i, :r + 1]
        scores = torch.einsum("hd,hjd->hj", q[i, :, r].double(), kk[i, :, :r + 1].double()) * 0.5
        att = torch.softmax(scores.masked_fill(~keys, float("-inf")), -1).mean(0)
        att[r] = 0.0
        want[i, :r + 1] = att / att.sum()
    pi, support = row_policy(q, k, 0.5, rows, kpm)
    torch.testing.assert_close(pi.double(), want, rtol=1e-5, atol=1e-6)
    assert torch.equal(support, want > 0)
    m = attention_metrics(SimpleNamespace(q=q, k=k, scale=0.5), kpm, rows, targets)
    entropy = -(torch.where(want > 0, want * want.clamp_min(1e-300).log(), torch.zeros_like(want))).sum(-1)
    assert m["attn_entropy"] == pytest.approx(float(entropy.mean()), rel=1e-5)
    assert m["attn_on_target"] == pytest.approx(float(want[torch.arange(b), targets].mean()), rel=1e-5)
    assert m["attn_uniform_entropy"] == pytest.approx(float((want > 0).sum(-1).double().log().mean()), rel=1e-6)


def _group_batch(task, model, completions, g):
    """A recorded batch of one prompt x g given completions, with the trainer's helpers."""
    from ral.integrations.transformers import AttentionPolicy
    prompts = task.sample(1, torch.Generator().manual_seed(1)).repeat(g)
    cmask = completion_mask(completions, task.eos_token_id)
    ids = torch.cat([prompts.input_ids, completions], 1)
    mask = torch.cat([prompts.attention_mask, cmask.long()], 1)
    policy = AttentionPolicy(model.lm, backend="reference")
    with torch.no_grad(), policy.record() as rec:
        model(ids, mask, **prompts.model_inputs())
    return prompts, ids, mask, cmask, policy, rec.reference


@pytest.mark.parametrize("fmt", ["direct", "zoom"])
def test_ans_row_in_the_model(fmt, one_thread):
    """In the task model: after the weights move, the <ans> row's sum_i A_i * JSD_i is 0 within a
    group in the direct format (shared prefix) and not in the zoom format (REGION differs)."""
    task, model = _tiny(fmt)
    g = 4
    shapes = [task.shape_token(i) for i in range(g)]
    if fmt == "direct":
        comp = torch.tensor([[ANS, s, 2] for s in shapes])
    else:
        comp = torch.tensor([[LOOK, 7 + i, ANS, s, 2] for i, s in enumerate(shapes)])
    prompts, ids, mask, cmask, policy, ref = _group_batch(task, model, comp, g)
    with torch.no_grad():
        for p in model.lm.parameters():
            p.add_(0.05 * torch.randn_like(p))
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.9]), g)
    row = task.rows()["ans"]
    with policy.compare(ref, row_mask=cmask) as cmp:
        model(ids, mask, **prompts.model_inputs())
    div_row = cmp.div[:, row].detach()
    assert float(div_row.min()) > 1e-5
    term = (adv * div_row).sum()
    if fmt == "direct":
        assert abs(float(term)) < 1e-6 * float(div_row.abs().sum())
    else:
        assert abs(float(term)) > 1e-3 * float(div_row.abs().sum())


def _trainer(tmp_path, control, lam=1.0):
    task, model = _tiny("zoom")
    cfg = TrainConfig(steps=2, prompts_per_step=2, group_size=4, ppo_epochs=2, minibatch_size=8, lr=1e-3,
                      beta=0.0, lambda_attn=lam, backend="auto", seed=0, eval_prompts=8, eval_every=2)
    return ZoomTrainer(model, task, cfg, str(tmp_path / control), attn_control=control, ratio_every=1), task


@pytest.mark.parametrize("control", ["none", "shuffle", "oracle"])
def test_trainer_controls_run(tmp_path, control, one_thread):
    trainer, task = _trainer(tmp_path, control)
    hist = trainer.train(progress=False)
    assert len(hist) == 2
    for key in ("attn_look_target", "attn_ans_target", "attn_ans_target_best_head", "attn_ans_dispersion",
                "region_diversity", "grad_ratio", "eval_accuracy"):
        assert key in hist[-1] and math.isfinite(hist[-1][key]), key
    assert hist[-1]["attn_ans_target_best_head"] >= hist[-1]["attn_ans_target"] - 1e-6
    assert hist[-1]["grad_norm_rl"] >= 0 and hist[-1]["grad_ratio"] >= 0
    if control == "oracle":                                    # no advantage in it: never 0
        assert hist[-1]["grad_ratio"] > 0


def test_shuffled_advantages_are_a_within_group_permutation(tmp_path, one_thread):
    trainer, _ = _trainer(tmp_path, "shuffle")
    batch = trainer.rollout()
    a, b = batch["adv"].view(-1, 4), batch["attn_adv"].view(-1, 4)
    assert torch.equal(a.sort(1).values, b.sort(1).values)


def test_oracle_loss_raises_target_mass(tmp_path, one_thread):
    """One SGD step on the oracle term alone raises the target mass at the <ans> row."""
    trainer, task = _trainer(tmp_path, "oracle")
    batch = trainer.rollout()
    idx = torch.arange(batch["ids"].shape[0])

    def loss_and_mass():
        with trainer.policy.compare(batch["reference"], row_mask=batch["cmask"]) as cmp:
            trainer.model(batch["ids"], batch["mask"], **batch["extras"])
        loss = trainer.attention_loss(batch, idx, cmp, batch["cmask"])
        q, k, scale = trainer.policy.captured
        pi, _ = row_policy(q, k, scale, task.rows()["ans"])
        mass = pi[idx, task.target_positions(batch["prompts"])].mean()
        return loss, float(mass.detach())

    loss, before = loss_and_mass()
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    with torch.no_grad():
        for p, gr in zip(params, grads):
            if gr is not None:
                p.sub_(0.5 * gr)
    _, after = loss_and_mass()
    assert after > before
    # and the metrics function reads the same mass from the recorded reference
    m = zoom_attention_metrics(batch["reference"].layers[-1], None, task, batch["prompts"], batch["comp"], 4)
    assert abs(m["attn_ans_target"] - before) < 1e-4
