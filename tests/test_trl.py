"""RALGRPOTrainer: real TRL training steps on a tiny random Qwen2 (from config, offline, tokenizer
built in code) with a rule-based reward, on CPU. lambda_attn = 0 must be GRPOTrainer exactly."""

import copy
import os
import warnings

import pytest
import torch

trl = pytest.importorskip("trl")
pytest.importorskip("datasets")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from ral import backends  # noqa: E402
from ral.integrations.distill import DistillConfig  # noqa: E402
from ral.integrations.transformers import token_segments  # noqa: E402
from ral.integrations.trl import RALGRPOTrainer, aggregate_like_trl, checkpointing_config  # noqa: E402
from ral.losses import attention_stats_token_loss  # noqa: E402
from test_attention_stats_integration import eager_statistics  # noqa: E402
from test_transformers_integration import IMAGE_TOKEN, _batch, _eager, _paper_div, _qwen25vl, gemma3_vlm  # noqa: E402

WORDS = ["<pad>", "<eos>", "<unk>"] + list("abcdefghijklmnop")


def tokenizer():
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def qwen2(hidden=32, heads=4, kv_heads=2, layers=2, seed=0):
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=len(WORDS), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    return Qwen2ForCausalLM(cfg)


def dataset():
    return Dataset.from_dict({"prompt": ["a b c", "d e f", "g h", "i j k l", "a a", "m n o", "p b", "c d"]})


def count_a(completions, **_):
    """Rule-based reward: how many 'a' tokens the completion has."""
    return [float(c.split().count("a")) for c in completions]


def config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4,
                max_completion_length=6, max_steps=3, learning_rate=1e-2, logging_steps=1, report_to="none",
                use_cpu=True, save_strategy="no", seed=0, num_iterations=2, gradient_accumulation_steps=2,
                bf16=False, dataloader_num_workers=0, disable_tqdm=True, **checkpointing_config(False))
    base.update(kw)
    return GRPOConfig(**base)


def saved_qwen2(path):
    """A saved checkpoint path: with beta > 0 TRL loads its reference model from it (offline)."""
    if not (path / "config.json").exists():
        qwen2().save_pretrained(path)
    return str(path)


def train(cls, tmp_path, cfg_kw=None, **kw):
    trainer = cls(model=saved_qwen2(tmp_path.parent / "init"), reward_funcs=count_a, args=config(tmp_path, **{"model_init_kwargs": {"dtype": torch.float32}, **(cfg_kw or {})}),
                  train_dataset=dataset(), processing_class=tokenizer(), **kw)
    trainer.train()
    return trainer


def losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_lambda_zero_is_grpo_exactly(tmp_path, loss_type):
    cfg = {"loss_type": loss_type, "beta": 0.04}
    base = train(GRPOTrainer, tmp_path / "grpo", cfg)
    ral = train(RALGRPOTrainer, tmp_path / "ral", cfg, lambda_attn=0.0)
    assert ral.attn_policy is None
    assert losses(ral) == losses(base) and len(losses(base)) == 3
    for (name, p), (_, q) in zip(base.model.named_parameters(), ral.model.named_parameters()):
        assert torch.equal(p, q), name
    # and the loss of one batch, bit for bit
    inputs = base._buffered_inputs[0]
    assert torch.equal(GRPOTrainer._compute_loss(base, base.model, inputs), ral._compute_loss(ral.model, inputs))


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_ral_steps_and_normalisation(tmp_path, loss_type):
    trainer = train(RALGRPOTrainer, tmp_path, {"loss_type": loss_type}, lambda_attn=1.0)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3 and all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)
    assert all("ral/attn_div" in h and "ral/attn_loss" in h for h in logs)
    assert any(h["ral/attn_div"] > 0 for h in logs[1:])       # the weights moved off the rollout's
    assert trainer.model.config._attn_implementation == "ral"

    # The added term is lambda * agg(A * div), with TRL's aggregation for this loss_type.
    inputs = trainer._buffered_inputs[1]
    model = trainer.model
    trainer.lambda_attn = 1.0
    l1 = trainer._compute_loss(model, inputs)
    attn = trainer._metrics["train"]["ral/attn_loss"][-1]
    trainer.lambda_attn = 3.0
    l3 = trainer._compute_loss(model, inputs)
    assert abs((l3 - l1).item() - 2 * attn) < 1e-6 * max(1.0, abs(l1.item()))

    mask = inputs["completion_mask"].float()
    attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    with torch.no_grad(), trainer.attn_policy.compare(trainer._load_reference(inputs, attention_mask),
                                                      row_mask=mask.bool(), attention_mask=attention_mask) as cmp:
        model(input_ids=ids, attention_mask=attention_mask)
    per_token = inputs["advantages"][:, None] * cmp.div[:, -mask.shape[1]:]
    accum = trainer.current_gradient_accumulation_steps
    if loss_type == "grpo":
        expected = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean() / accum
    elif loss_type == "bnpo":
        expected = (per_token * mask).sum() / mask.sum() / accum
    elif loss_type == "dr_grpo":
        expected = (per_token * mask).sum() / (mask.shape[0] * trainer.max_completion_length) / accum
    else:
        norm = inputs["num_items_in_batch"] * accum / trainer.args.steps_per_generation
        expected = (per_token * mask).sum() / norm
    assert abs(attn - expected.item()) < 1e-6 + 1e-4 * abs(expected.item())
    assert torch.allclose(aggregate_like_trl(trainer, per_token, mask, inputs, "train"), expected)


def test_one_step_per_generation_warns_and_adds_nothing(tmp_path):
    """num_iterations = 1 with steps_per_generation = gradient_accumulation_steps: the trainer warns that
    the attention term has no gradient, and one step indeed trains GRPO's weights (float tolerance: the
    chosen layer runs the op instead of SDPA) although lambda_attn = 5; with num_iterations = 2 no warning."""
    cfg = {"num_iterations": 1, "max_steps": 1}
    base = train(GRPOTrainer, tmp_path / "grpo", cfg)
    with pytest.warns(UserWarning, match="num_iterations = 1 and steps_per_generation = gradient_accumulation"):
        ral = train(RALGRPOTrainer, tmp_path / "ral", cfg, lambda_attn=5.0)
    assert "ral/attn_loss" in ral.state.log_history[0]
    for (name, p), (_, q) in zip(base.model.named_parameters(), ral.model.named_parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        RALGRPOTrainer(model=qwen2(), reward_funcs=count_a, args=config(tmp_path / "two"), train_dataset=dataset(),
                       processing_class=tokenizer(), lambda_attn=5.0)


def test_ral_with_gradient_checkpointing(tmp_path):
    trainer = train(RALGRPOTrainer, tmp_path, {**checkpointing_config(True), "max_steps": 2}, lambda_attn=1.0)
    assert all(torch.isfinite(torch.tensor(x)) for x in losses(trainer))
    # compare() pauses checkpointing of the chosen layer only for its block: the setting is back on
    layers = trainer.model.model.layers
    assert layers[-1].gradient_checkpointing is True
    assert all(layer.gradient_checkpointing is True for layer in layers)


def test_checkpointing_config_uses_the_current_name(tmp_path):
    """checkpointing_config names the field this transformers reads without a deprecation warning, and
    TRL sees the setting through args.gradient_checkpointing either way."""
    import warnings
    for enabled in (True, False):
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*checkpointing.*deprecated", category=FutureWarning)
            args = GRPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, **checkpointing_config(enabled))
        assert args.gradient_checkpointing is enabled


def test_distillation_terms(tmp_path):
    teacher = qwen2(hidden=48, heads=6, kv_heads=3, layers=3, seed=1)   # other head count / dim / depth
    trainer = train(RALGRPOTrainer, tmp_path, {"max_steps": 2}, lambda_attn=0.0, teacher_model=teacher,
                    distill=DistillConfig(mu=1.0, gamma_attn=1.0, lambda_rl=1.0, chunk_size=8))
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert all("ral/token_kl" in h and "ral/teacher_attn_jsd" in h for h in logs)
    assert all(h["ral/token_kl"] > 0 and h["ral/teacher_attn_jsd"] > 0 for h in logs)
    with pytest.raises(ValueError, match="lambda_attn must be 0"):
        RALGRPOTrainer(model=qwen2(), reward_funcs=count_a, args=config(tmp_path), train_dataset=dataset(),
                       processing_class=tokenizer(), lambda_attn=1.0, teacher_model=teacher,
                       distill=DistillConfig(gamma_attn=1.0))


def test_attached_policy_lambda_zero_matches_grpo(tmp_path):
    """lambda_attn = 0 with the policy attached: the reference is recorded and the loss forward runs
    the chosen (last) layer on ral's fused op (compare mode), not SDPA. Over several steps the
    losses and the trained weights equal plain GRPOTrainer's (SDPA everywhere) within float tolerance.
    Plain SGD: Adam's normalised step turns a gradient of ~1e-8 into a step of ~lr whose sign the
    last bits decide, so two runs equal to float precision can differ by 1e-5 in single weights
    (seen with trl 1.16, transformers 5.25: 1.5e-5 in one element, losses equal to 1e-7); with SGD the
    steps follow the gradients, and the weights must agree to 1e-4 of the largest step (measured:
    4e-9 against steps of 2e-3; with lambda_attn = 100 instead of 0 they differ by 4e-7 and fail)."""
    cfg = {"loss_type": "bnpo", "beta": 0.04, "max_steps": 4, "optim": "sgd"}
    base = train(GRPOTrainer, tmp_path / "grpo", cfg)
    backend = "cpu" if "cpu" in backends.available() else "reference"
    ral = train(RALGRPOTrainer, tmp_path / "ral", cfg, lambda_attn=0.0, attach_policy=True, attn_backend=backend)
    assert ral.attn_policy is not None and ral.model.config._attn_implementation == "ral"
    logs = [h for h in ral.state.log_history if "loss" in h]
    assert len(logs) == 4 and all("ral/attn_div" in h for h in logs)      # the attention path ran every step
    assert any(h["ral/attn_div"] > 0 for h in logs[1:])                   # ... on weights that moved
    torch.testing.assert_close(torch.tensor(losses(ral)), torch.tensor(losses(base)), rtol=1e-4, atol=1e-6)
    init = dict(qwen2().named_parameters())                                 # the saved init model
    step = max(float((p - init[name]).detach().abs().max()) for name, p in base.model.named_parameters())
    assert step > 1e-4                                                     # training changed the weights
    for (name, p), (_, q) in zip(base.model.named_parameters(), ral.model.named_parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-4 * step, msg=name)
    with pytest.raises(ValueError, match="attach_policy"):
        RALGRPOTrainer(model=qwen2(), reward_funcs=count_a, args=config(tmp_path), train_dataset=dataset(),
                       processing_class=tokenizer(), lambda_attn=0.0, attach_policy=True,
                       teacher_model=qwen2(seed=1), distill=DistillConfig(gamma_attn=1.0))


# ----------------------------------------------------------------------------------------------
# Attention statistics on a tiny Qwen2.5-VL (made in code): logged mass on the image tokens and
# the statistics loss against the same numbers from eager attention maps
# ----------------------------------------------------------------------------------------------

def _vl_generation(gen):
    """What GRPOTrainer's generation step hands on for two samples of a VLM: prompt (left padded,
    one 4x4-patch image each) + completion (right padded), pixels, grids, advantages."""
    inputs, mask, _ = _batch("qwen25vl", gen)           # (2, 14): prompt = first 10 tokens, completion = last 4
    ids = inputs["input_ids"]
    return {"prompt_ids": ids[:, :10], "prompt_mask": mask[:, :10].long(), "completion_ids": ids[:, 10:],
            "completion_mask": mask[:, 10:].long(), "advantages": torch.tensor([0.5, -0.5]),
            "num_items_in_batch": mask[:, 10:].sum(), "pixel_values": inputs["pixel_values"],
            "image_grid_thw": inputs["image_grid_thw"], "num_images": [1, 1]}


@pytest.mark.parametrize("lambda_attn,coefs", [(1.0, (0.0, 0.0)), (0.0, (0.5, 2.0))])
def test_vl_step_logs_attention_statistics_equal_to_eager_maps(tmp_path, monkeypatch, lambda_attn, coefs):
    torch.manual_seed(0)
    model = _qwen25vl().float()
    initial = _eager(copy.deepcopy(model))
    batch = _vl_generation(torch.Generator().manual_seed(0))
    monkeypatch.setattr(GRPOTrainer, "_generate_and_score_completions", lambda self, inputs: dict(batch))
    backend = "cpu" if "cpu" in backends.available() else "reference"
    entropy_coef, mass_coef = coefs
    # one step at the rollout weights: the statistics are what is checked (the trainer warns that the
    # attention term cannot act there)
    expected = pytest.warns(UserWarning, match="one optimizer step") if lambda_attn > 0 else warnings.catch_warnings()
    with expected:
        trainer = RALGRPOTrainer(model=model, reward_funcs=count_a,
                                 args=config(tmp_path, per_device_train_batch_size=2, num_generations=2,
                                             max_completion_length=4, max_steps=1, num_iterations=1,
                                             gradient_accumulation_steps=1, loss_type="grpo"),
                                 train_dataset=dataset(), processing_class=tokenizer(), lambda_attn=lambda_attn,
                                 attn_stats=True, attn_backend=backend, attn_entropy_coef=entropy_coef,
                                 attn_mass_coef=mass_coef, attn_mass_segments=("image",))
    assert trainer.attn_policy.segment_names == ("text", "image", "video")
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 1 and ("ral/attn_div" in logs[0]) == (lambda_attn > 0)

    # the same numbers from the eager maps of the initial weights on the (shuffled) micro-batch
    inputs = trainer._buffered_inputs[0]
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    with torch.no_grad():
        attn = initial(input_ids=ids, attention_mask=attention_mask, pixel_values=inputs["pixel_values"],
                       image_grid_thw=inputs["image_grid_thw"], output_attentions=True).attentions[-1]
    entropy, mass = eager_statistics(attn, attention_mask.bool(), token_segments(ids, IMAGE_TOKEN, 61))
    rows = inputs["completion_mask"].bool()
    entropy, mass = entropy[:, -4:][rows], mass[:, -4:][rows]           # the response rows
    assert float(mass[:, 1].mean()) > 0.05                              # they do look at the image
    assert logs[0]["ral/attn_mass/image"] == pytest.approx(float(mass[:, 1].mean()), abs=2e-6, rel=1e-5)
    assert logs[0]["ral/attn_entropy"] == pytest.approx(float(entropy.mean()), abs=2e-6, rel=1e-5)
    for i, name in enumerate(("text", "image", "video")):
        assert logs[0][f"ral/attn_mass/{name}"] == pytest.approx(float(mass[:, i].mean()), abs=2e-6, rel=1e-5)
    if mass_coef:
        full_entropy, full_mass = (torch.zeros(rows.shape, dtype=torch.float64), torch.zeros(rows.shape + (3,),
                                                                                             dtype=torch.float64))
        full_entropy[rows], full_mass[rows] = entropy, mass
        per_token = attention_stats_token_loss(full_entropy, full_mass, 4, entropy_coef=entropy_coef,
                                               mass_coef=mass_coef, segments=(1,))
        want = aggregate_like_trl(trainer, per_token, rows, inputs, "train")
        assert logs[0]["ral/attn_stats_loss"] == pytest.approx(float(want), abs=2e-6, rel=1e-5)
    else:
        assert "ral/attn_stats_loss" not in logs[0]


def test_attention_statistics_options_misuse(tmp_path):
    kw = dict(reward_funcs=count_a, args=config(tmp_path), train_dataset=dataset(), processing_class=tokenizer())
    with pytest.raises(ValueError, match="attn_mass_coef"):              # a text model has no segments
        RALGRPOTrainer(model=qwen2(), lambda_attn=0.0, attn_mass_coef=1.0, **kw)
    with pytest.raises(ValueError, match="attn_mass_segments"):
        RALGRPOTrainer(model=qwen2(), lambda_attn=0.0, attn_mass_coef=1.0, attn_segment_names=("a", "b"),
                       attn_segments=lambda ids: (ids == 3).long(), attn_mass_segments=("image",), **kw)
    with pytest.raises(ValueError, match="attn_segments"):
        RALGRPOTrainer(model=qwen2(), lambda_attn=0.0, attn_stats=True, attn_segments=lambda ids: ids, **kw)
    with pytest.raises(ValueError, match="attn_entropy_coef"):
        RALGRPOTrainer(model=qwen2(), lambda_attn=0.0, attn_entropy_coef=float("nan"), **kw)


# ----------------------------------------------------------------------------------------------
# Gemma 3's bidirectional image blocks (token_type_ids) through the trainer
# ----------------------------------------------------------------------------------------------

def _gemma3_generation():
    """What GRPOTrainer's generation step hands on for two samples of a Gemma 3 VLM: prompt (left
    padded, one 4-token image each), completion (right padded), token_type_ids over both (TRL extends
    the processor's with zeros for the completion), pixels, advantages."""
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 250, (2, 14), generator=gen)
    ids[0, 3], ids[0, 4:8], ids[0, 8] = 261, 260, 262          # row 0: three padding tokens, then its image
    ids[1, 1], ids[1, 2:6], ids[1, 6] = 261, 260, 262
    mask = torch.ones(2, 14, dtype=torch.long)
    mask[0, :3] = 0
    mask[1, 13:] = 0
    return {"prompt_ids": ids[:, :10], "prompt_mask": mask[:, :10], "completion_ids": ids[:, 10:],
            "completion_mask": mask[:, 10:], "advantages": torch.tensor([0.7, -0.3]),
            "num_items_in_batch": mask[:, 10:].sum(), "token_type_ids": (ids == 260).long(),
            "pixel_values": torch.randn(2, 3, 28, 28, generator=gen), "num_images": [1, 1]}


def test_gemma3_vlm_image_blocks_in_the_trainer(tmp_path, monkeypatch):
    """A Gemma 3 VLM under RALGRPOTrainer with decoder layer 0 chosen (its image rows feed the
    completion logits through layer 1). lambda_attn = 0 with the policy attached trains GRPOTrainer's
    weights (SGD, float tolerance): the chosen layer's image rows keep the model's bidirectional
    attention in the trainer's record and compare calls. lambda_attn = 1 trains with the attention
    term, and its divergence at the completion rows equals the paper's JSD from eager attention maps
    of the trained and the rollout weights."""
    batch = _gemma3_generation()
    monkeypatch.setattr(GRPOTrainer, "_generate_and_score_completions", lambda self, inputs: copy.deepcopy(batch))
    torch.manual_seed(0)
    init = gemma3_vlm().float()
    backend = "cpu" if "cpu" in backends.available() else "reference"

    def run(cls, name, **kw):
        args = config(tmp_path / name, per_device_train_batch_size=2, num_generations=2, max_completion_length=4,
                      max_steps=2, gradient_accumulation_steps=1, loss_type="grpo", optim="sgd")
        trainer = cls(model=copy.deepcopy(init), reward_funcs=count_a, args=args, train_dataset=dataset(),
                      processing_class=tokenizer(), **kw)
        trainer.train()
        return trainer

    base = run(GRPOTrainer, "grpo")
    ral0 = run(RALGRPOTrainer, "ral0", lambda_attn=0.0, attach_policy=True, attn_layers=(0,), attn_backend=backend)
    logs = [h for h in ral0.state.log_history if "loss" in h]
    assert len(logs) == 2 and all("ral/attn_div" in h for h in logs)
    torch.testing.assert_close(torch.tensor(losses(ral0)), torch.tensor(losses(base)), rtol=1e-4, atol=1e-6)
    start = dict(init.named_parameters())
    step = max(float((p - start[name]).detach().abs().max()) for name, p in base.model.named_parameters())
    assert step > 1e-4
    for (name, p), (_, q) in zip(base.model.named_parameters(), ral0.model.named_parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-4 * step, msg=name)

    ral1 = run(RALGRPOTrainer, "ral1", lambda_attn=1.0, attn_layers=(0,), attn_backend=backend)
    logs = [h for h in ral1.state.log_history if "loss" in h]
    assert logs[1]["ral/attn_div"] > 0
    inputs = ral1._buffered_inputs[0]
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    call = dict(input_ids=ids, attention_mask=attention_mask, pixel_values=inputs["pixel_values"],
                token_type_ids=inputs["token_type_ids"])
    rows = torch.zeros(ids.shape, dtype=torch.bool)
    rows[:, -4:] = inputs["completion_mask"].bool()
    with torch.no_grad(), ral1.attn_policy.compare(ral1._load_reference(inputs, attention_mask), row_mask=rows,
                                                   attention_mask=attention_mask) as cmp:
        ral1.model(**call)
    eager = _eager(init)
    with torch.no_grad():
        old = eager(**call, output_attentions=True).attentions[0]
        eager.load_state_dict(ral1.model.state_dict())
        new = eager(**call, output_attentions=True).attentions[0]
    want = torch.where(rows, _paper_div(new, old, attention_mask.bool()), torch.zeros((), dtype=torch.float64))
    assert float(want.max()) > 1e-6
    torch.testing.assert_close(cmp.div.double(), want, atol=1e-6, rtol=1e-4)
