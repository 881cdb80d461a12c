"""Shared by the veRL tests (Qwen2 in test_verl_actor.py, Qwen2.5-VL in test_verl_actor_vl.py): the gloo
process group, a TrainingWorker (FSDP2 engine, CPU) on a tiny model, batches in veRL's driver layout,
the old-log-prob pass and the updates, and the checks both models run.

Import after ``VERL_PLATFORM=cpu`` is set (cpu_platform registers the platform before veRL picks one).
"""

import os
import socket
from functools import partial

import pytest
import torch

import cpu_platform
from tensordict import TensorDict
from verl.trainer.config import CheckpointConfig
from verl.trainer.ppo.core_algos import agg_loss
from verl.utils import tensordict_utils as tu
from verl.workers.config import (FSDPActorConfig, FSDPEngineConfig, FSDPOptimizerConfig, HFModelConfig,
                                 TrainingWorkerConfig)
from verl.workers.utils.losses import ppo_loss
from verl.workers.utils.padding import no_padding_2_padding

import ral
from ral.integrations.verl import RALConfig, attach

cpu_platform.register_cpu_engine()
cpu_platform.register_ulysses_sdpa()
from verl.workers.engine_workers import TrainingWorker  # noqa: E402

P, R, B = 5, 6, 8           # prompt width (left padded), response width (right padded), samples


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", autouse=True)
def process_group():
    if not torch.distributed.is_initialized():
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0")
        torch.distributed.init_process_group("gloo")
    torch.set_num_threads(1)
    yield


def make_worker(model_path, remove_padding=True, dynamic=False, checkpointing=False, agg="token-mean", lr=5e-2,
                adam_eps=1e-8, attn="sdpa", sp=1):
    engine = FSDPEngineConfig(strategy="fsdp2", model_dtype="fp32", use_torch_compile=False,
                              ulysses_sequence_parallel_size=sp,
                              mixed_precision={"param_dtype": "fp32", "reduce_dtype": "fp32", "buffer_dtype": "fp32"},
                              micro_batch_size_per_gpu=2 if not dynamic else None, infer_micro_batch_size_per_gpu=4,
                              use_dynamic_bsz=dynamic, max_token_len_per_gpu=40, infer_max_token_len_per_gpu=40)
    model = HFModelConfig(path=model_path, load_tokenizer=False, use_remove_padding=remove_padding,
                          enable_gradient_checkpointing=checkpointing, override_config={"attn_implementation": attn})
    optim = FSDPOptimizerConfig(lr=lr, weight_decay=0.0, clip_grad=1e9, override_optimizer_config={"eps": adam_eps})
    worker = TrainingWorker(TrainingWorkerConfig(model_type="language_model", model_config=model, engine_config=engine,
                                                 optimizer_config=optim, checkpoint_config=CheckpointConfig()))
    worker.reset()
    actor = FSDPActorConfig(strategy="fsdp2", rollout_n=2, ppo_mini_batch_size=B, ppo_micro_batch_size_per_gpu=2,
                            use_dynamic_bsz=dynamic, ppo_max_token_len_per_gpu=40, loss_agg_mode=agg, clip_ratio=0.2)
    worker.set_loss_fn(partial(ppo_loss, config=actor))
    return worker, actor


def padded_chunk(start, stop, seed=0, prompt_width=P, min_prompt=2):
    """Rows start:stop of a GRPO batch in veRL's padded driver layout (before left_right_2_no_padding):
    prompts left padded to ``prompt_width``, responses right padded to R, text tokens in [2, 32)."""
    g = torch.Generator().manual_seed(seed)
    p_len = torch.randint(min_prompt, prompt_width + 1, (B,), generator=g)
    r_len = torch.randint(2, R + 1, (B,), generator=g)
    prompts = torch.zeros(B, prompt_width, dtype=torch.long)
    responses = torch.zeros(B, R, dtype=torch.long)
    pmask = torch.zeros(B, prompt_width, dtype=torch.long)
    rmask = torch.zeros(B, R, dtype=torch.long)
    for i in range(B):
        prompts[i, prompt_width - p_len[i]:] = torch.randint(2, 32, (int(p_len[i]),), generator=g)
        pmask[i, prompt_width - p_len[i]:] = 1
        responses[i, :r_len[i]] = torch.randint(2, 32, (int(r_len[i]),), generator=g)
        rmask[i, :r_len[i]] = 1
    rmask[0, 1] = 0
    attention_mask = torch.cat([pmask, (responses != 0).long() * (torch.arange(R) < r_len[:, None])], 1)
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    scores = torch.randn(B // 2, 2, generator=g)
    adv = ((scores - scores.mean(1, keepdim=True)) / (scores.std(1, keepdim=True) + 1e-6)).reshape(B)
    td = TensorDict({"prompts": prompts, "responses": responses, "input_ids": torch.cat([prompts, responses], 1),
                     "attention_mask": attention_mask, "position_ids": position_ids, "response_mask": rmask,
                     "advantages": adv[:, None] * rmask}, batch_size=[B])
    return td[start:stop]


def old_log_probs(worker, batch, ral_handle=None):
    data = batch.clone()
    tu.assign_non_tensor(data, temperature=1.0, calculate_entropy=False, compute_loss=False)
    if ral_handle is not None:
        with ral_handle.recording():
            out = worker.infer_batch(data)
    else:
        out = worker.infer_batch(data)
    if getattr(worker.engine, "use_ulysses_sp", False):
        # only the sp group's first rank returns the output; veRL's driver hands the same batch to every
        # rank of the group (here the whole world is one sp group)
        box = [out]
        torch.distributed.broadcast_object_list(box, src=0)
        out = box[0]
    batch["old_log_probs"] = no_padding_2_padding(tu.get(out, "log_probs"), batch).float()
    return out


def with_reference(worker, batch, ral_handle):
    """old_log_probs with the policy's reference recorded, its tensors stored in ``batch`` under the
    handle's keys (what veRL's driver carries from the rollout to the update)."""
    out = old_log_probs(worker, batch, ral_handle)
    for key in ral_handle.batch_keys:
        batch[key] = tu.get(out, key)
    return batch


def update(worker, batch, epochs=1, shuffle=False):
    data = batch.clone()
    tu.assign_non_tensor(data, temperature=1.0, calculate_entropy=False, compute_loss=True, global_batch_size=B // 2,
                         mini_batch_size=B // 2, epochs=epochs, seed=1, dataloader_kwargs={"shuffle": shuffle})
    out = worker.train_mini_batch(data)
    return None if out is None else tu.get(out, "metrics")      # None: an sp rank that does not collect


def params(worker):
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in worker.engine.module.state_dict().items()}


# ----------------------------------------------------------------------------------------------
# The checks both models run
# ----------------------------------------------------------------------------------------------

def check_lambda_zero_is_verl_exactly(model_path, make_batch, remove_padding=True):
    base, _ = make_worker(model_path, remove_padding)
    batch = make_batch()
    old_log_probs(base, batch)
    m_base = update(base, batch, epochs=2)
    p_base = params(base)

    worker, actor = make_worker(model_path, remove_padding)
    handle = attach(worker, RALConfig(lambda_attn=0.0), actor)
    batch2 = make_batch()
    old_log_probs(worker, batch2, handle)
    assert torch.equal(batch2["old_log_probs"], batch["old_log_probs"])
    m = update(worker, batch2, epochs=2)
    assert m["loss"] == m_base["loss"] and len(m["loss"]) == 4
    assert all(torch.equal(p_base[k], v) for k, v in params(worker).items())
    assert "ral/attn_loss" not in m


def expected_term(load_model, qk_last_layer, before, after, batch, agg, lam):
    """lambda * agg_loss(A * div) for the first mini-batch, with the float64 reference op on the last
    layer's post-rotary q, k computed by hand: ``qk_last_layer(model, batch, i)`` for sample i of
    ``batch``, ``load_model()`` a fresh fp32 eager copy of the model."""
    models = []
    for state in (before, after):
        m = load_model()
        m.load_state_dict(state)
        models.append(m.eval())
    rlen = batch["attention_mask"][:, batch["prompts"].shape[1]:].sum(1)
    half = B // 2
    div = torch.zeros(half, R, dtype=torch.float64)
    with torch.no_grad():
        for i in range(half):
            q_ref, k_ref = qk_last_layer(models[0], batch, i)
            q, k = qk_last_layer(models[1], batch, i)
            d = ral.ops.attention_kl(q.double(), k.double(), q_ref=q_ref.double(), k_ref=k_ref.double(),
                                     backend="reference").div[0]
            div[i, :rlen[i]] = d[-int(rlen[i]):]
    mask = batch["response_mask"][:half].bool()
    n_tokens = int(batch["response_mask"][:half].sum())
    return lam * float(agg_loss(batch["advantages"][:half].double() * div, mask, agg, dp_size=1,
                                batch_num_tokens=n_tokens, global_batch_size=half))


def check_attention_term_matches_reference_op(model_path, make_batch, expected, remove_padding, dynamic,
                                              checkpointing, agg, qk_shapes):
    """``expected(before, after, batch, agg, lam)``: the term recomputed outside ral (``expected_term``);
    ``qk_shapes``: the recorded (heads, head_dim) of q and of k."""
    lam = 3.0
    worker, actor = make_worker(model_path, remove_padding, dynamic, checkpointing, agg)
    handle = attach(worker, RALConfig(lambda_attn=lam), actor)
    batch = make_batch()
    with_reference(worker, batch, handle)
    assert (batch["ral_q0"].values().shape[1:], batch["ral_k0"].values().shape[1:]) == qk_shapes
    before = params(worker)
    # a first update at the rollout weights moves them (its attention term is ~0: JSD is at its minimum)
    update(worker, batch)
    after = params(worker)
    metrics = update(worker, batch)       # second update: the first mini-batch runs at `after`
    got = metrics["ral/attn_loss"]
    expected = expected(before, after, batch, agg, 1.0)
    # veRL sums the micro-batches' terms of a mini-batch (they are normalised by the global counts):
    # got[0] is the first mini-batch's lambda-free term. fp32 model vs float64 reference op on q/k
    # computed in fp32 by hand: agreement to float tolerance, not bit for bit.
    assert len(got) == 2
    assert abs(float(got[0]) - expected) <= 1e-3 * abs(expected) + 1e-8, (got, expected)
    assert abs(expected) > 1e-6
    assert all(float(v) >= 0 for v in metrics["ral/attn_div"])
    handle.remove()
    assert "forward_step" not in worker.engine.__dict__
    return worker


def check_remove_padding_on_off_same_loss(model_path, make_batch):
    losses = []
    for remove_padding in (True, False):
        worker, actor = make_worker(model_path, remove_padding)
        handle = attach(worker, RALConfig(lambda_attn=2.0), actor)
        batch = make_batch()
        with_reference(worker, batch, handle)
        update(worker, batch)
        losses.append(update(worker, batch))
    for key in ("loss", "ral/attn_loss"):
        a, b = (torch.tensor([float(v) for v in m[key]]) for m in losses)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
