"""RAL in veRL 0.9.x's actor: real TrainingWorker updates (FSDP2 engine, gloo, CPU, no Ray) on a tiny
random Qwen2 made in code. Run in its own venv (see examples/verl/README.md):

    VERL_PLATFORM=cpu python -m pytest -q tests/verl
"""

import os
import sys
import warnings

import pytest
import torch

# "verl" alone would also find this folder (a namespace package when tests/ is on sys.path)
pytest.importorskip("verl.protocol")
os.environ.setdefault("VERL_PLATFORM", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from functools import partial  # noqa: E402

# common registers the "cpu" platform and engine before veRL picks one; process_group: an autouse fixture
import cpu_platform  # noqa: E402
from common import (B, P, check_attention_term_matches_reference_op, check_lambda_zero_is_verl_exactly,  # noqa: E402,F401
                    check_remove_padding_on_off_same_loss, expected_term, free_port, make_worker, old_log_probs,
                    padded_chunk, params, process_group, update, with_reference)
from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: E402
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.workers.utils.padding import left_right_2_no_padding  # noqa: E402

from ral.integrations.verl import RALConfig, attach  # noqa: E402


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_qwen2")
    cfg = Qwen2Config(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, eos_token_id=1,
                      bos_token_id=1, tie_word_embeddings=False)
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    return str(path)


def make_batch(seed=0):
    """A padded GRPO batch as veRL's driver holds it, converted with veRL's left_right_2_no_padding."""
    return left_right_2_no_padding(padded_chunk(0, B, seed))


def test_lambda_zero_is_verl_exactly(model_path):
    check_lambda_zero_is_verl_exactly(model_path, make_batch)


def _qk_last_layer(model, batch, i):
    """Post-rotary q, k of the last layer for sample i, computed by hand (no ral code)."""
    ids = batch["input_ids"].unbind()[i]
    layer = model.model.layers[-1]
    attn = layer.self_attn
    pos = torch.arange(ids.numel())[None]
    h = model(ids[None], position_ids=pos, output_hidden_states=True).hidden_states[-2]
    x = layer.input_layernorm(h)
    shape = (1, ids.numel(), -1, attn.head_dim)
    q = attn.q_proj(x).view(shape).transpose(1, 2)
    k = attn.k_proj(x).view(shape).transpose(1, 2)
    cos, sin = model.model.rotary_emb(h, pos)
    return apply_rotary_pos_emb(q, k, cos, sin)


def _expected_term(model_path, before, after, batch, agg, lam):
    load = partial(Qwen2ForCausalLM.from_pretrained, model_path, dtype=torch.float32, attn_implementation="eager")
    return expected_term(load, _qk_last_layer, before, after, batch, agg, lam)


@pytest.mark.parametrize("remove_padding,dynamic,checkpointing,agg", [
    (True, False, False, "token-mean"),
    (False, False, True, "seq-mean-token-mean"),
    (True, True, True, "seq-mean-token-sum"),
])
def test_attention_term_matches_reference_op(model_path, remove_padding, dynamic, checkpointing, agg):
    check_attention_term_matches_reference_op(model_path, make_batch, partial(_expected_term, model_path),
                                              remove_padding, dynamic, checkpointing, agg, ((4, 8), (2, 8)))


def test_remove_padding_on_off_same_loss(model_path):
    check_remove_padding_on_off_same_loss(model_path, partial(make_batch, 1))


def test_reference_follows_shuffle_and_dynamic_batching(model_path):
    """One mini-batch of the whole batch: shuffling (veRL's dataloader) and dynamic batching reorder the
    samples; the reference travels with them, so the attention term is the same."""
    terms = []
    for shuffle, dynamic in ((False, False), (True, False), (True, True)):
        worker, actor = make_worker(model_path, dynamic=dynamic)
        handle = attach(worker, RALConfig(lambda_attn=2.0), actor)
        batch = make_batch(2)
        with_reference(worker, batch, handle)
        data = batch.clone()
        tu.assign_non_tensor(data, temperature=1.0, calculate_entropy=False, compute_loss=True, global_batch_size=B,
                             mini_batch_size=B, epochs=2, seed=3, dataloader_kwargs={"shuffle": shuffle})
        terms.append([float(v) for v in tu.get(worker.train_mini_batch(data), "metrics")["ral/attn_loss"]])
    assert abs(terms[0][1]) > 1e-6
    for other in terms[1:]:
        torch.testing.assert_close(torch.tensor(other), torch.tensor(terms[0]), rtol=1e-4, atol=1e-8)


def prompt_response_segments(batch):
    """A ``ral_segments`` field for a batch from make_batch / padded_chunk: per token 0 in the prompt,
    1 in the response (nested like input_ids)."""
    cu = batch["input_ids"].offsets()
    rlen = batch["attention_mask"][:, P:].sum(1)
    segments = torch.cat([(torch.arange(int(n)) >= int(n) - int(r)).long() for n, r in zip(cu.diff(), rlen)])
    return torch.nested.nested_tensor_from_jagged(segments, offsets=cu)


STATS_METRICS = ("ral/attn_entropy", "ral/attn_mass/prompt", "ral/attn_mass/response")


def _dp_body(rank, world, model_path, remove_padding, sp=1, lam=2.0, seed=3, checkpointing=False, stats=False,
             dynamic=False):
    """Two updates on one mini-batch of the whole batch; ``sp``: veRL's Ulysses size (the model then on
    cpu_platform's ULYSSES_SDPA, veRL's all-to-all over SDPA); ``lam=0``: veRL alone (nothing attached);
    ``stats``: RALConfig(stats=True) with prompt / response segments, their metrics in "stats";
    ``dynamic``: veRL's dynamic batch size (micro-batches by token budget).
    The results of rank 0 (the others' metrics are None under sp)."""
    # Adam's eps 1e-4: the k_proj bias has an exactly-zero gradient (softmax ignores a constant added to
    # every key of a row), and Adam with eps 1e-8 turns its rounding noise into lr-sized steps that
    # differ between 1 and 2 processes. With eps 1e-4 that noise moves nothing.
    worker, actor = make_worker(model_path, remove_padding, dynamic=dynamic, checkpointing=checkpointing, adam_eps=1e-4,
                                sp=sp, attn=cpu_platform.ULYSSES_SDPA if sp > 1 else "sdpa")
    config = RALConfig(lambda_attn=lam, stats=stats, segment_names=("prompt", "response") if stats else None)
    handle = attach(worker, config, actor) if lam else None
    per = B // (world // sp)
    # veRL's dispatch gives dp rank r the r-th contiguous chunk of the batch (the same to an sp group)
    dp_rank = rank // sp
    batch = left_right_2_no_padding(padded_chunk(dp_rank * per, (dp_rank + 1) * per, seed))
    if handle is not None:
        with_reference(worker, batch, handle)
    else:
        old_log_probs(worker, batch)
    if stats:
        batch["ral_segments"] = prompt_response_segments(batch)
    losses, terms, stat_values = [], [], []
    for _ in range(2):
        data = batch.clone()
        tu.assign_non_tensor(data, temperature=1.0, calculate_entropy=False, compute_loss=True, global_batch_size=B,
                             mini_batch_size=B, epochs=1, seed=1, dataloader_kwargs={"shuffle": False})
        out = worker.train_mini_batch(data)
        metrics = tu.get(out, "metrics") if out is not None else {"loss": [], "ral/attn_loss": []}
        losses.append(metrics["loss"])
        terms.append(metrics.get("ral/attn_loss", [0.0]))
        if stats:
            stat_values.append([float(x) for name in STATS_METRICS for x in metrics.get(name, [])])
    return {"params": params(worker), "losses": losses, "terms": terms, "stats": stat_values,
            "old_log_probs": batch["old_log_probs"]}


def _dp_run(rank, world, port, model_path, remove_padding, out_path, sp=1, runs=({},)):
    """_dp_body on rank ``rank`` of ``world`` gloo processes, once per keyword dict of ``runs``; rank 0 saves
    the results (a list for several runs)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), VERL_PLATFORM="cpu")
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    results = [_dp_body(rank, world, model_path, remove_padding, sp, **run) for run in runs]
    if rank == 0:
        torch.save(results if len(runs) > 1 else results[0], out_path)
    torch.distributed.destroy_process_group()


def _two_ranks(tmp_path, model_path, sp=1, runs=({},)):
    """_dp_run on 2 spawned gloo processes; rank 0's saved results."""
    import torch.multiprocessing as mp
    path = tmp_path / "world2.pt"
    mp.start_processes(_dp_run, args=(2, free_port(), model_path, True, str(path), sp, runs), nprocs=2, join=True,
                       start_method="spawn")
    return torch.load(path, weights_only=False)


def _assert_same_run(two, one, params_tol=(1e-5, 1e-6)):
    for k, v in one["params"].items():
        torch.testing.assert_close(two["params"][k], v, rtol=params_tol[0], atol=params_tol[1])
    for key in ("losses", "terms"):
        a, b = (torch.tensor([[float(x) for x in step] for step in r[key]]) for r in (one, two))
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


def test_two_fsdp_processes_equal_one(model_path, tmp_path):
    """FSDP2 over gloo: 2 data-parallel processes with the same global batch (one mini-batch) give the
    same losses, attention terms and parameters as 1 process (float tolerance: the reductions differ)."""
    one = _dp_body(0, 1, model_path, True)               # this process: a gloo group of 1
    two = _two_ranks(tmp_path, model_path)
    _assert_same_run(two, one)
    assert abs(float(one["terms"][1][0])) > 1e-6


def test_ulysses_two_ranks_equal_one(model_path, tmp_path):
    """veRL's Ulysses (ulysses_sequence_parallel_size=2 on 2 gloo processes; the model on cpu_platform's
    ULYSSES_SDPA, so veRL's head all-to-all runs, over SDPA) gives sp=1's old log-probs, losses and
    parameters: veRL alone, and with RAL, whose chosen layer runs ral.distributed.attention_kl_cp_varlen
    on veRL's contiguous slices instead of the all-to-all (the attention terms equal, too, and with
    RALConfig(stats=True) the logged entropy and segment masses), also with veRL's dynamic batch size."""
    # seed 6: packed micro-batches of 35 and 28 tokens in the old-log-prob pass, 18, 17, 11, 17 in the
    # update: veRL pads the odd ones by one token for sp=2, the even ones not
    # with RAL: gradient checkpointing on (the chosen layer's recompute is paused, the others' all-to-alls recompute)
    runs = (dict(lam=0.0, seed=6), dict(lam=2.0, seed=6, checkpointing=True, stats=True),
            dict(lam=2.0, seed=6, dynamic=True))
    ones = [_dp_body(0, 1, model_path, True, 1, **run) for run in runs]
    twos = _two_ranks(tmp_path, model_path, 2, runs)
    for one, two in zip(ones, twos):
        torch.testing.assert_close(two["old_log_probs"], one["old_log_probs"], rtol=1e-5, atol=1e-6)
        # the parameters after two Adam steps: attention over other shapes (heads split, keys gathered) rounds
        # differently, and Adam turns gradient rounding into parameter moves of up to ~1e-5 relative
        _assert_same_run(two, one, params_tol=(1e-4, 1e-5))
    assert abs(float(ones[1]["terms"][1][0])) > 1e-6 and abs(float(ones[2]["terms"][1][0])) > 1e-6
    assert float(ones[1]["losses"][1][0]) != float(ones[0]["losses"][1][0])      # the term moved the loss
    # the statistics: logged at both steps (3 metrics each), equal under sp = 2, not all the same number
    stats_one, stats_two = (torch.tensor(r["stats"]) for r in (ones[1], twos[1]))
    assert stats_one.shape == (2, len(STATS_METRICS)) and stats_one[:, 1:].min() > 0.01
    torch.testing.assert_close(stats_two, stats_one, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(stats_one[:, 1] + stats_one[:, 2], torch.ones(2, dtype=stats_one.dtype))


def test_actor_rollout_ref_worker_from_config(model_path):
    """The trainer-level worker (veRL's ActorRolloutRefWorker + RAL from actor_rollout_ref.ral), built
    without Ray from veRL's own generated ppo_trainer config: compute_log_prob records, update_actor
    adds the term."""
    import verl
    from omegaconf import OmegaConf, open_dict
    from ral.integrations.verl import worker_class

    config = OmegaConf.load(os.path.join(os.path.dirname(verl.__file__), "trainer/config/_generated_ppo_trainer.yaml"))
    a = config.actor_rollout_ref
    a.model.path = model_path
    a.model.override_config = {"attn_implementation": "sdpa"}
    a.actor.strategy = "fsdp2"
    a.actor.ppo_mini_batch_size = B // 2
    a.actor.ppo_micro_batch_size_per_gpu = 2
    a.actor.fsdp_config.mixed_precision = {"param_dtype": "fp32", "reduce_dtype": "fp32", "buffer_dtype": "fp32"}
    a.actor.fsdp_config.model_dtype = "fp32"
    a.actor.fsdp_config.use_torch_compile = False      # torch.compile of the entropy on CPU: slow
    a.actor.use_torch_compile = False
    a.actor.optim.lr = 5e-2
    a.rollout.log_prob_micro_batch_size_per_gpu = 4
    with open_dict(a):
        a.ral = {"lambda_attn": 2.0, "layers": [-1]}
    OmegaConf.resolve(config)
    worker = worker_class()(config=a, role="actor")
    worker.init_model()
    assert worker.ral.active and worker.actor.loss_fn.func.__name__ == "ral_ppo_loss"

    batch = make_batch()
    data = batch.clone()
    tu.assign_non_tensor(data, temperature=1.0, calculate_entropy=True, compute_loss=False)
    out = worker.compute_log_prob(data)
    from verl.workers.utils.padding import no_padding_2_padding
    batch["old_log_probs"] = no_padding_2_padding(tu.get(out, "log_probs"), batch).float()
    for key in worker.ral.batch_keys:
        batch[key] = tu.get(out, key)
    data = batch.clone()
    tu.assign_non_tensor(data, temperature=1.0, calculate_entropy=False, compute_loss=True, global_batch_size=B // 2,
                         mini_batch_size=B // 2, epochs=1, seed=1, dataloader_kwargs={"shuffle": True})
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="ral: lambda_attn > 0 with one optimizer step")
        metrics = tu.get(worker.update_actor(data), "metrics")
    assert len(metrics["ral/attn_loss"]) == 2 and abs(float(metrics["ral/attn_loss"][1])) > 0

    # the whole batch as one mini-batch, one epoch: one step at the rollout weights, where the term's
    # gradient is zero; the worker says so (once)
    data = batch.clone()
    tu.assign_non_tensor(data, temperature=1.0, calculate_entropy=False, compute_loss=True, global_batch_size=B,
                         mini_batch_size=B, epochs=1, seed=1, dataloader_kwargs={"shuffle": True})
    with pytest.warns(UserWarning, match="one optimizer step per rollout"):
        assert worker.ral.check_updates(data) == 1
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        assert worker.ral.check_updates(data) == 1
    assert not [w for w in again if "one optimizer step" in str(w.message)]       # once per actor


def test_other_layers_keep_the_models_attention(model_path):
    """A model on another attention implementation (on GPU: flash_attention_2) keeps it in every layer
    but the chosen one: here a counting copy of SDPA registered under a new name."""
    from counting_attention import register_counting_sdpa    # in tests/, on sys.path through its conftest

    calls = register_counting_sdpa("counted_sdpa")
    terms = []
    for attn in ("sdpa", "counted_sdpa"):
        worker, actor = make_worker(model_path, attn=attn)
        handle = attach(worker, RALConfig(lambda_attn=2.0), actor)
        batch = make_batch(4)
        with_reference(worker, batch, handle)
        update(worker, batch)
        terms.append([float(v) for v in update(worker, batch)["ral/attn_loss"]])
        if attn == "counted_sdpa":
            assert handle.policy.model.config._attn_implementation == "ral+counted_sdpa"
            assert calls and set(calls) == {0}          # layer 1 (the chosen one) never reached the base
            handle.remove()
            assert handle.engine.module.config._attn_implementation == "counted_sdpa"
    torch.testing.assert_close(torch.tensor(terms[1]), torch.tensor(terms[0]), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("remove_padding", [True, False])
def test_attention_statistics_metrics_match_eager_maps(model_path, remove_padding):
    """RALConfig(stats=True) with caller-given segments (a ``ral_segments`` field: 0 prompt, 1 response):
    ral/attn_entropy and ral/attn_mass/<segment> of the first mini-batch (at the initial weights)
    equal the numbers from eager attention maps: per micro-batch (2 samples) the mean over the
    response tokens, then veRL's mean over the micro-batches."""
    worker, actor = make_worker(model_path, remove_padding)
    handle = attach(worker, RALConfig(lambda_attn=2.0, stats=True, segment_names=("prompt", "response")), actor)
    batch = with_reference(worker, make_batch(), handle)
    ids, cu = batch["input_ids"].values(), batch["input_ids"].offsets()
    rlen = batch["attention_mask"][:, P:].sum(1)
    lengths = cu.diff()
    batch["ral_segments"] = prompt_response_segments(batch)
    metrics = update(worker, batch)
    handle.remove()

    model = Qwen2ForCausalLM.from_pretrained(model_path, dtype=torch.float32, attn_implementation="eager").eval()
    per_sample = []
    with torch.no_grad():
        for i in range(B // 2):
            seq = ids[cu[i]:cu[i + 1]]
            n, r = int(lengths[i]), int(rlen[i])
            attn = model(seq[None], position_ids=torch.arange(n)[None], output_attentions=True).attentions[-1]
            p = torch.where(torch.ones(n, n, dtype=torch.bool).tril(-1), attn[0].double().mean(0),
                            torch.zeros((), dtype=torch.float64))
            pi = p / p.sum(-1, keepdim=True).clamp_min(1e-300)
            entropy = -torch.where(pi > 0, pi * pi.clamp_min(1e-300).log(), torch.zeros((), dtype=torch.float64)).sum(-1)
            response_mass = pi[:, n - r:].sum(-1)
            rows = torch.zeros(n, dtype=torch.bool)
            rows[n - r:] = batch["response_mask"][i, :r].bool()
            per_sample.append((entropy[rows], response_mass[rows], 1 - response_mass[rows]))
    for k, name in enumerate(("ral/attn_entropy", "ral/attn_mass/response", "ral/attn_mass/prompt")):
        micro = [torch.cat([per_sample[i][k] for i in pair]).mean() for pair in ((0, 1), (2, 3))]
        want = float(sum(micro) / 2)
        assert abs(float(metrics[name][0]) - want) <= 2e-6 + 1e-5 * abs(want), (name, metrics[name], want)
    assert 0.05 < float(metrics["ral/attn_mass/response"][0]) < 0.95


def test_ulysses_refuses_sdpa(model_path):
    """Under Ulysses (an engine with use_ulysses_sp; no second process needed to build RAL's hook) an
    SDPA / eager model is refused (veRL's all-to-all runs only in the flash-attention forward, so veRL
    itself would attend within each rank's slice); nothing is attached."""
    from types import SimpleNamespace
    from transformers import Qwen2ForCausalLM as Model
    model = Model.from_pretrained(model_path, dtype=torch.float32, attn_implementation="sdpa")
    engine = SimpleNamespace(use_ulysses_sp=True, ulysses_parallel_group=None, pad_to_length=False, module=model)
    worker = SimpleNamespace(engine=engine, loss_fn=None, set_loss_fn=None)
    with pytest.raises(ValueError, match="needs the model on a flash-attention implementation, got 'sdpa'"):
        attach(worker, RALConfig(lambda_attn=1.0))
    assert "forward_step" not in vars(engine)


def test_config_from_veRL_keys_checked():
    """``actor_rollout_ref.ral`` as Hydra gives it: a misspelt key trained with every default and
    ``stats: "false"`` became True; both are errors now, and values are checked where they are made."""
    assert RALConfig.from_dict({"lambda_attn": 2, "layers": [-1, 0], "stats": True}) == \
        RALConfig(lambda_attn=2, layers=(-1, 0), stats=True)
    assert RALConfig.from_dict(None) == RALConfig()
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['lamda_attn'\]"):
        RALConfig.from_dict({"lamda_attn": 0.5})
    with pytest.raises(TypeError, match="stats must be a bool, got str"):
        RALConfig.from_dict({"stats": "false"})
    with pytest.raises(ValueError, match="lambda_attn must be a finite float >= 0"):
        RALConfig(lambda_attn=float("inf"))
    with pytest.raises(ValueError, match="divergence must be one of"):
        RALConfig.from_dict({"divergence": "js"})
