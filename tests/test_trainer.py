"""The thin GRPO + RAL trainer, the grounding task and the CLI, on tiny settings."""

import copy
import json
import os
import warnings

import pytest
import torch

pytest.importorskip("transformers")

from ral.train.cli import main  # noqa: E402
from ral.integrations.transformers import AttentionPolicy  # noqa: E402
from ral.losses import attention_policy_loss  # noqa: E402
from ral.train.tasks.grounding import GroundingConfig, GroundingTask  # noqa: E402
from ral.train.trainer import RALTrainer, TrainConfig, completion_mask, evaluate, sft_warmup  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


SMALL = GroundingConfig(rows=2, cols=2, n_colours=3, n_shapes=3, feature_dim=8, hidden_size=32, layers=2,
                        heads=4, kv_heads=2, intermediate_size=32)


def _setup(tmp_path, name, steps=2, lambda_attn=1.0, **kw):
    task = GroundingTask(SMALL)
    torch.manual_seed(0)
    model = task.build_model()
    ref = task.build_model()
    ref.load_state_dict(model.state_dict())
    cfg = TrainConfig(**{**dict(steps=steps, prompts_per_step=2, group_size=4, minibatch_size=4, ppo_epochs=2,
                                lambda_attn=lambda_attn, seed=3), **kw})
    return RALTrainer(model, task, cfg, str(tmp_path / name), ref_model=ref)


def test_task_prompts_and_reward():
    task = GroundingTask(SMALL)
    p = task.sample(64, torch.Generator().manual_seed(0))
    assert p.input_ids.shape == (64, 1 + 4 + 2)
    # the named value is unique in the grid
    for b in range(64):
        named = int(p.input_ids[b, -1])
        feats = p.cell_features[b]
        assert feats.shape == (4, 8)
        assert named >= 7
    good = task.sft_targets(p)
    r = task.reward(good, p)
    assert bool((r["accuracy"] == 1).all()) and bool((r["format"] == 1).all())
    assert torch.allclose(r["reward"], torch.ones(64))
    bad = good.clone()
    bad[:, 2] = 0
    r = task.reward(bad, p)
    assert torch.allclose(r["reward"], torch.full((64,), 0.9))
    assert torch.equal(completion_mask(torch.tensor([[5, 2, 0, 2]]), 2), torch.tensor([[True, True, False, False]]))


def test_target_is_unique_named_value():
    task = GroundingTask(SMALL)
    g = torch.Generator().manual_seed(1)
    p = task.sample(200, g)
    # rebuild attributes from features by nearest code
    col = ((p.cell_features[..., None, :] - task.pos_codes[None, :, None, :]
            - task.colour_codes[None, None, :, None, :].squeeze(3)) ** 2).sum(-1)
    assert col.shape[0] == 200


def test_attention_term_has_zero_gradient_at_old_weights():
    task = GroundingTask(SMALL)
    torch.manual_seed(0)
    model = task.build_model()
    policy = AttentionPolicy(model.lm)
    p = task.sample(4, torch.Generator().manual_seed(0))
    comp = task.sft_targets(p)
    ids = torch.cat([p.input_ids, comp], 1)
    mask = torch.ones_like(ids)
    with torch.no_grad(), policy.record() as rec:
        model(ids, mask, **p.model_inputs())
    with policy.compare(rec.reference, row_mask=torch.ones_like(comp, dtype=torch.bool)) as cmp:
        model(ids, mask, **p.model_inputs())
    attention_policy_loss(cmp.div, torch.tensor([1.0, -1.0, 2.0, 0.5]), torch.ones_like(comp)).backward()
    grads = [q.grad.abs().max() for q in model.parameters() if q.grad is not None]
    assert grads and float(max(grads)) < 1e-5


def test_single_update_per_rollout_warns(tmp_path):
    """lambda_attn > 0 with ppo_epochs = 1 and one minibatch per step (the term's gradient is zero at
    the old weights, previous test): a warning; several minibatches or epochs: none."""
    with pytest.warns(UserWarning, match="ppo_epochs = 1 and one minibatch per step"):
        _setup(tmp_path, "one", ppo_epochs=1, minibatch_size=8)          # 2 prompts x 4 samples
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        _setup(tmp_path, "minibatches", ppo_epochs=1)                    # minibatches of 4 of 8
        _setup(tmp_path, "epochs", ppo_epochs=2, minibatch_size=8)
        _setup(tmp_path, "grpo", ppo_epochs=1, minibatch_size=8, lambda_attn=0.0)


def test_train_resume_and_interrupt(tmp_path):
    full = _setup(tmp_path, "full", steps=3)
    full.train(progress=False)
    lines = [json.loads(x) for x in open(full.metrics_path)]
    assert [m["step"] for m in lines] == [1, 2, 3]
    for key in ("reward", "accuracy", "loss_rl", "loss_attn", "attn_entropy", "attn_on_target", "attn_jsd"):
        assert key in lines[0]
    assert os.path.exists(full.ckpt_path) and not os.path.exists(full.ckpt_path + ".tmp")

    # interrupted during step 3: the checkpoint of step 2 survives; resuming matches the full run
    part = _setup(tmp_path, "part", steps=3)
    original = part.train_step
    calls = {"n": 0}

    def flaky():
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original()

    part.train_step = flaky
    with pytest.raises(KeyboardInterrupt):
        part.train(progress=False)
    assert torch.load(part.ckpt_path, weights_only=False)["step"] == 2
    resumed = _setup(tmp_path, "part", steps=3)
    resumed.train(progress=False)
    assert resumed.step == 3
    assert [json.loads(x)["step"] for x in open(resumed.metrics_path)] == [1, 2, 3]
    for (n, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, msg=n)


def test_ral_differs_from_grpo(tmp_path):
    grpo = _setup(tmp_path, "grpo", steps=1, lambda_attn=0.0)
    ral = _setup(tmp_path, "ral", steps=1, lambda_attn=5.0)

    def noisy_reward(comp, prompts):       # an untrained model scores 0 everywhere: give it signal
        r = torch.rand(comp.shape[0], generator=torch.Generator().manual_seed(0))
        return {"reward": r, "accuracy": r, "format": r}

    grpo.task.reward = ral.task.reward = noisy_reward
    mg, mr = grpo.train(progress=False)[0], ral.train(progress=False)[0]
    assert mg["reward"] == mr["reward"]            # same seeds: the same first rollout
    assert mg["loss_attn"] != 0.0 or mr["loss_attn"] != 0.0
    diff = max(float((a - b).abs().max()) for a, b in
               zip(grpo.model.state_dict().values(), ral.model.state_dict().values()))
    assert diff > 0


def test_sft_and_evaluate():
    task = GroundingTask(SMALL)
    torch.manual_seed(0)
    model = task.build_model()
    before = evaluate(model, task, n=16)
    out = sft_warmup(model, task, steps=60, batch_size=32, lr=3e-3, progress=False)
    after = evaluate(model, task, n=16)
    assert out["sft_loss"] < 1.5                  # ln(13) = 2.56 at chance; the format tokens are easy
    assert after["format"] > before["format"]


def test_cli_train_and_compare(tmp_path):
    common = ["--steps", "2", "--sft-steps", "3", "--prompts-per-step", "2", "--group-size", "4",
              "--minibatch-size", "8", "--eval-prompts", "16", "--eval-every", "1", "--no-progress"]
    for method in ("grpo", "ral"):
        assert main(["train", "--method", method, "--seed", "0", "--out", str(tmp_path / method)] + common) == 0
    png = tmp_path / "cmp.png"
    assert main(["compare", str(tmp_path / "grpo"), str(tmp_path / "ral"), "--out", str(png)]) == 0
    data = json.load(open(tmp_path / "cmp.json"))
    assert set(data["methods"]) == {"grpo", "ral"} and png.exists()


def test_cli_distill_and_kd(tmp_path):
    """``ral train --method distill|kd`` (README): a student with other head counts learns from a
    teacher checkpoint; distill logs the token KL and the attention JSD, kd the token KL alone.
    A GRPO term (``--lambda-rl``) with groups of one sample is refused before anything runs."""
    assert main(["train", "--method", "grpo", "--out", str(tmp_path / "warm"), "--steps", "0", "--sft-steps", "3",
                 "--eval-prompts", "0", "--no-progress"]) == 0
    teacher = str(tmp_path / "sft-grounding-s0-3.pt")
    common = ["--teacher", teacher, "--student-heads", "2", "--steps", "2", "--prompts-per-step", "2",
              "--group-size", "2", "--eval-prompts", "8", "--eval-every", "1", "--no-progress"]
    for method in ("distill", "kd"):
        assert main(["train", "--method", method, "--out", str(tmp_path / method)] + common) == 0
        rows = [json.loads(x) for x in open(tmp_path / method / "metrics.jsonl")]
        trained = [r for r in rows if "token_kl" in r]
        assert len(trained) == 2 and all(r["token_kl"] > 0 for r in trained)
        assert all((r.get("attn_jsd", 0.0) > 0) == (method == "distill") for r in trained), trained
        assert (tmp_path / method / "student.pt").exists()
    with pytest.raises(ValueError, match="group_size must be an int >= 2"):
        main(["train", "--method", "distill", "--out", str(tmp_path / "rl1"), "--teacher", teacher, "--lambda-rl", "1",
              "--group-size", "1", "--no-progress"])


def test_attention_statistics_in_metrics_and_compare(tmp_path):
    """attn_stats: metrics.jsonl gets ral/attn_entropy and ral/attn_mass/{text,image} of the response
    rows; the compare call's mass on the image cells equals the eager maps'; the statistics loss
    (bnpo) is -coef * the logged image mass; ``ral compare`` draws a second figure of them."""
    runs = {}
    for name, kw in (("grpo", dict(lambda_attn=0.0)), ("ral", dict(lambda_attn=1.0, attn_mass_coef=2.0,
                                                                   loss_type="bnpo"))):
        trainer = _setup(tmp_path, name, steps=2, attn_stats=True, **kw)
        trainer.train(progress=False)
        runs[name] = trainer
        lines = [json.loads(x) for x in open(trainer.metrics_path)]
        for m in lines:
            assert m["ral/attn_mass/text"] + m["ral/attn_mass/image"] == pytest.approx(1.0, abs=1e-5)
            assert m["ral/attn_entropy"] > 0 and m["ral/attn_mass/image"] > 0
        if name == "ral":
            for m in lines:
                assert m["ral/attn_stats_loss"] == pytest.approx(-2.0 * m["ral/attn_mass/image"], rel=1e-5, abs=1e-7)
        else:
            assert "ral/attn_stats_loss" not in lines[0]

    # the embedded path (inputs_embeds, segment ids from the task) against eager maps
    trainer = runs["grpo"]
    batch = trainer.rollout()
    rows = torch.zeros_like(batch["ids"], dtype=torch.bool)
    rows[:, -batch["cmask"].shape[1]:] = batch["cmask"]
    with torch.no_grad(), trainer.policy.observe(row_mask=rows, key_segments=batch["segments"]) as obs:
        trainer.model(batch["ids"], batch["mask"], **batch["extras"])
    eager = copy.deepcopy(trainer.model)
    eager.lm.set_attn_implementation("eager")
    with torch.no_grad():
        attn = eager(batch["ids"], batch["mask"], **batch["extras"], output_attentions=True).attentions[-1]
    s = attn.shape[-1]
    keep = torch.ones(s, s, dtype=torch.bool).tril(-1)[None] & batch["mask"].bool()[:, None, :]
    p = torch.where(keep, attn.double().mean(1), torch.zeros((), dtype=torch.float64))
    pi = p / p.sum(-1, keepdim=True).clamp_min(1e-300)
    image = (pi * batch["segments"][:, None, :]).sum(-1)
    assert float(image[rows].mean()) > 0.05
    torch.testing.assert_close(obs.mass[..., 1][rows].double(), image[rows], atol=2e-6, rtol=1e-5)

    png = tmp_path / "cmp.png"
    assert main(["compare", str(tmp_path / "grpo"), str(tmp_path / "ral"), "--out", str(png)]) == 0
    data = json.load(open(tmp_path / "cmp.json"))
    assert (tmp_path / "cmp-attention.png").exists()
    final = data["attention"]["methods"]["ral"]["final"]
    assert set(final) == {"ral/attn_entropy", "ral/attn_mass/text", "ral/attn_mass/image"}
    logged = [json.loads(x)["ral/attn_mass/image"] for x in open(runs["ral"].metrics_path)]
    assert final["ral/attn_mass/image"]["mean"] == pytest.approx(sum(logged) / len(logged))


@pytest.mark.parametrize("field,value,message", [
    ("group_size", 1, "group_size must be an int >= 2"), ("ppo_epochs", 0, "ppo_epochs must be an int >= 1"),
    ("minibatch_size", 0, "minibatch_size must be an int >= 1"), ("prompts_per_step", 0, "prompts_per_step must"),
    ("steps", 2.0, "steps must be an int"), ("lambda_attn", -1.0, "lambda_attn must be a finite float >= 0"),
    ("temperature", 0.0, "temperature must be a finite float > 0"), ("lr", float("nan"), "lr must be a finite"),
    ("epsilon_high", -0.1, "epsilon_high must"), ("attn_mass_coef", float("inf"), "attn_mass_coef must be a finite"),
    ("backend", "gpu", "backend must be one of"), ("divergence", "js", "divergence must be one of"),
    ("loss_type", "ppo", "loss_type must be one of")])
def test_config_refuses_what_cannot_train(tmp_path, field, value, message):
    """Each value crashed mid-run (minibatch_size 0, prompts_per_step 0), failed only after the warm-up
    (backend, temperature), or trained to no effect (group_size 1: every advantage 0; ppo_epochs 0) or
    against RAL's sign (lambda_attn < 0). The CLI checks before the warm-up: nothing is written."""
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{field: value})
    flag = {"epsilon_high": "--epsilon-high"}.get(field, "--" + field.replace("_", "-"))
    if field in ("attn_mass_coef", "steps", "divergence", "loss_type"):
        return                                     # not a CLI value, or one argparse checks (int, choices)
    sft = tmp_path / "sft.pt"
    with pytest.raises(ValueError, match=message):
        main(["train", "--out", str(tmp_path / "run"), "--sft-checkpoint", str(sft), "--no-progress", flag, str(value)])
    assert not sft.exists() and not (tmp_path / "run").exists()


def test_statistics_loss_needs_segments(tmp_path):
    task = GroundingTask(SMALL)
    no_segments = type("NoSegments", (), {k: getattr(task, k) for k in ("sample", "reward", "max_new_tokens",
                                                                        "eos_token_id", "pad_token_id")})()
    with pytest.raises(ValueError, match="attn_mass_coef"):
        RALTrainer(task.build_model(), no_segments, TrainConfig(attn_mass_coef=1.0, beta=0.0), str(tmp_path / "x"))
    with pytest.raises(ValueError, match="attn_mass_segments"):
        RALTrainer(task.build_model(), task, TrainConfig(attn_mass_coef=1.0, attn_mass_segments=(2,), beta=0.0),
                   str(tmp_path / "y"))
