"""RAL in veRL 0.9.x's actor on a tiny random Qwen2.5-VL made in code: images in the prompts, carried as
veRL's driver carries them (``multi_modal_inputs``: one dict of ``pixel_values`` / ``image_grid_thw`` /
``images_seqlens`` per sample, a NonTensorStack in the batch), Qwen2.5-VL's (4, L) position ids (text
row, then the three M-RoPE rows) per sample. Real TrainingWorker updates (FSDP2 engine, gloo, CPU, no Ray).

veRL's own remove_padding path cannot run a Qwen2-VL / Qwen2.5-VL model on CPU: with
``use_remove_padding=True`` its apply_monkey_patch replaces the decoder attention's forward with
``verl.models.transformers.qwen2_vl.qwen2_vl_attn_forward``, which calls flash-attn directly and fails
without it (``NameError: name '_flash_use_top_left_mask' is not defined``, qwen2_vl.py line 331). So
"lambda_attn = 0 is veRL" is checked without remove padding; with RAL attached (lambda_attn > 0) both
run, since the integration gives those layers transformers' forward back (see ral/integrations/verl.py).
"""

import contextlib
import os
import sys
from functools import partial
from types import MethodType, SimpleNamespace

import pytest
import torch

pytest.importorskip("verl.protocol")
os.environ.setdefault("VERL_PLATFORM", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# common registers the "cpu" platform and engine before veRL picks one; process_group: an autouse fixture
from common import (B, check_attention_term_matches_reference_op, check_lambda_zero_is_verl_exactly,  # noqa: E402,F401
                    check_remove_padding_on_off_same_loss, expected_term, make_worker, old_log_probs, padded_chunk,
                    process_group, with_reference)
from tensordict.tensorclass import NonTensorData, NonTensorStack  # noqa: E402
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration  # noqa: E402
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen2_5_vl  # noqa: E402
from transformers.models.qwen2_vl import modeling_qwen2_vl as qwen2_vl  # noqa: E402
from verl.workers.utils.padding import left_right_2_no_padding  # noqa: E402

from ral.integrations.verl import RALConfig, attach  # noqa: E402

PW = 8                       # prompt width: a vision block (start, 2 image tokens, end) + 2 to 4 text tokens
VISION_START, VISION_END, IMAGE, VIDEO = 58, 59, 60, 61
GRID = (1, 2, 4)             # t, h, w patches of every image: 8 patches, 2x2-merged into 2 image tokens
PATCH = 2                    # pixels per patch side; a patch is 3 channels x 2 frames x 2 x 2 = 24 values

# veRL's apply_monkey_patch sets these classes' forward for the whole process when it builds a Qwen2(.5)-VL
# model (the attention's only with remove_padding); kept from before any worker is built, so that every
# test starts as a fresh veRL process and the by-hand recomputation runs transformers' code.
_PATCHED = [qwen2_vl.Qwen2VLAttention, qwen2_vl.Qwen2VLModel, qwen2_vl.Qwen2VLForConditionalGeneration,
            qwen2_5_vl.Qwen2_5_VLAttention, qwen2_5_vl.Qwen2_5_VLModel, qwen2_5_vl.Qwen2_5_VLForConditionalGeneration]
_TRANSFORMERS = {cls: cls.__dict__["forward"] for cls in _PATCHED}


@contextlib.contextmanager
def transformers_forwards():
    current = {cls: cls.__dict__["forward"] for cls in _PATCHED}
    for cls, forward in _TRANSFORMERS.items():
        cls.forward = forward
    try:
        yield
    finally:
        for cls, forward in current.items():
            cls.forward = forward


@pytest.fixture(autouse=True)
def fresh_process():
    with transformers_forwards():
        yield


def _config():
    text = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=1,
                tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]})
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32, in_channels=3,
                  patch_size=PATCH, temporal_patch_size=2, spatial_merge_size=2, window_size=8,
                  fullatt_block_indexes=[0])
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE, video_token_id=VIDEO,
                            vision_start_token_id=VISION_START, vision_end_token_id=VISION_END,
                            tie_word_embeddings=False)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_qwen2_5_vl")
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(_config()).save_pretrained(path)
    return str(path)


def _processor(config):
    """What veRL's hf_processor binds for Qwen2.5-VL: the model class's get_rope_index on the processor."""
    proc = SimpleNamespace(config=config, image_token_id=IMAGE, video_token_id=VIDEO)
    proc.get_rope_index = MethodType(qwen2_5_vl.Qwen2_5_VLModel.get_rope_index, proc)
    proc.get_vision_position_ids = MethodType(qwen2_5_vl.Qwen2_5_VLModel.get_vision_position_ids, proc)
    return proc


def make_batch(seed=0):
    """A padded GRPO batch with one image at the start of every prompt, as veRL's agent loop makes it
    (AgentLoopWorker._compute_multi_modal_inputs / _compute_position_ids, then DataProto.to_tensordict),
    converted with veRL's left_right_2_no_padding."""
    td = padded_chunk(0, B, seed, prompt_width=PW, min_prompt=6)
    g = torch.Generator().manual_seed(100 + seed)
    proc = _processor(_config())
    input_ids, mask = td["input_ids"], td["attention_mask"]
    positions, inputs = [], []
    for i in range(B):
        start = int((mask[i, :PW] == 0).sum())
        input_ids[i, start:start + 4] = torch.tensor([VISION_START, IMAGE, IMAGE, VISION_END])
        grid = torch.tensor([GRID])
        patches = int(grid.prod())
        inputs.append({"pixel_values": torch.randn(patches, 3 * 2 * PATCH * PATCH, generator=g),
                       "image_grid_thw": grid, "images_seqlens": torch.tensor([patches])})
        ids, valid = input_ids[i:i + 1], mask[i:i + 1]
        mm_token_type_ids = (ids == IMAGE).long()
        vision, _ = proc.get_rope_index(input_ids=ids, attention_mask=valid, image_grid_thw=grid,
                                        video_grid_thw=None, mm_token_type_ids=mm_token_type_ids)
        text = torch.ones(1, ids.shape[1], dtype=torch.long)
        text[0, valid[0].bool()] = torch.arange(int(valid.sum()))
        positions.append(torch.cat([text, vision[:, 0]], 0))           # (4, seq_len)
    td["prompts"] = input_ids[:, :PW]
    td["position_ids"] = torch.stack(positions)                         # (B, 4, seq_len)
    td["multi_modal_inputs"] = NonTensorStack.from_list([NonTensorData(x) for x in inputs])
    return left_right_2_no_padding(td)


def _qk_last_layer(model, batch, i):
    """Post-rotary q, k of the last decoder layer for sample i, computed by hand from transformers'
    pieces (vision tower, text model, M-RoPE), no ral or veRL code."""
    ids = batch["input_ids"].unbind()[i]
    pos = batch["position_ids"].unbind()[i][:, None]                   # (4, 1, L)
    mm = batch["multi_modal_inputs"][i]
    mm = mm.data if hasattr(mm, "data") else mm
    text = model.model.language_model
    embeds = text.embed_tokens(ids[None])
    image = torch.cat(model.model.get_image_features(mm["pixel_values"], mm["image_grid_thw"]).pooler_output)
    embeds = embeds.masked_scatter((ids == IMAGE)[None, :, None].expand_as(embeds), image)
    h = text(inputs_embeds=embeds, position_ids=pos, output_hidden_states=True).hidden_states[-2]
    layer = text.layers[-1]
    attn = layer.self_attn
    x = layer.input_layernorm(h)
    shape = (1, ids.numel(), -1, attn.head_dim)
    q = attn.q_proj(x).view(shape).transpose(1, 2)
    k = attn.k_proj(x).view(shape).transpose(1, 2)
    cos, sin = text.rotary_emb(h, pos[1:])
    return qwen2_5_vl.apply_multimodal_rotary_pos_emb(q, k, cos, sin, attn.config.rope_parameters["mrope_section"])


def _expected_term(model_path, before, after, batch, agg, lam):
    load = partial(Qwen2_5_VLForConditionalGeneration.from_pretrained, model_path, dtype=torch.float32,
                   attn_implementation="eager")
    with transformers_forwards():
        return expected_term(load, _qk_last_layer, before, after, batch, agg, lam)


def test_vl_batch_is_verls():
    """The batch carries what veRL's engine reads: nested (4, L) position ids whose text row restarts at 0
    per sample, one multi-modal dict per sample; the image tokens get M-RoPE positions."""
    batch = make_batch()
    pos = batch["position_ids"].unbind()
    assert all(p.shape[0] == 4 and torch.equal(p[0], torch.arange(p.shape[1])) for p in pos)
    ids = batch["input_ids"].unbind()
    assert all(int((x == IMAGE).sum()) == 2 for x in ids)
    assert any(not torch.equal(p[1], p[0]) for p in pos)
    assert len(batch["multi_modal_inputs"]) == B


def test_vl_lambda_zero_is_verl_exactly(model_path):
    check_lambda_zero_is_verl_exactly(model_path, make_batch, remove_padding=False)


@pytest.mark.parametrize("remove_padding,dynamic,checkpointing,agg", [
    (True, False, False, "token-mean"),
    (False, False, True, "seq-mean-token-mean"),
    (True, True, True, "seq-mean-token-sum"),
])
def test_vl_attention_term_matches_reference_op(model_path, remove_padding, dynamic, checkpointing, agg):
    worker = check_attention_term_matches_reference_op(
        model_path, make_batch, partial(_expected_term, model_path), remove_padding, dynamic, checkpointing, agg,
        ((4, 8), (2, 8)))
    # remove() gave the decoder attention veRL's forward back
    layers = worker.engine.module.model.language_model.layers
    assert all("forward" not in layer.self_attn.__dict__ for layer in layers)


def test_vl_remove_padding_on_off_same_loss(model_path):
    check_remove_padding_on_off_same_loss(model_path, partial(make_batch, 1))


def test_vl_packed_log_probs_are_verls(model_path):
    """With RAL attached and remove padding on (the decoder attention back on transformers' forward, the
    packing read from the text row of the position ids, the chosen layer in ral's varlen op), the
    old-log-prob pass gives veRL's own log-probs (of its padded path: its packed one needs flash-attn).
    Float tolerance: other attention kernels, other summation orders."""
    base, _ = make_worker(model_path, remove_padding=False)
    expected = make_batch(2)
    old_log_probs(base, expected)
    worker, actor = make_worker(model_path, remove_padding=True)
    handle = attach(worker, RALConfig(lambda_attn=2.0), actor)
    assert any(module is handle.policy.modules[0] for module in handle._restored)
    batch = with_reference(worker, make_batch(2), handle)
    assert batch["ral_k0"].values().shape[0] == batch["input_ids"].values().shape[0]   # image tokens' keys too
    torch.testing.assert_close(batch["old_log_probs"], expected["old_log_probs"], rtol=1e-5, atol=1e-5)


def test_vl_under_ulysses_is_refused(model_path):
    """Under Ulysses a Qwen2.5-VL model whose attention veRL patched (its all-to-all lives in that
    patched forward, which RAL would replace) is refused; nothing is attached, the patch stays."""
    import cpu_platform
    from verl.models.transformers.monkey_patch import apply_monkey_patch
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_path, dtype=torch.float32,
                                                               attn_implementation=cpu_platform.ULYSSES_SDPA)
    with transformers_forwards():
        apply_monkey_patch(model, ulysses_sp_size=2, use_remove_padding=True)
        patched = qwen2_5_vl.Qwen2_5_VLAttention.forward
        assert patched is not _TRANSFORMERS[qwen2_5_vl.Qwen2_5_VLAttention]
        engine = SimpleNamespace(use_ulysses_sp=True, ulysses_parallel_group=None, pad_to_length=False, module=model)
        worker = SimpleNamespace(engine=engine, loss_fn=None, set_loss_fn=None)
        with pytest.raises(ValueError, match="with a Qwen2-VL / Qwen2.5-VL model is not supported"):
            attach(worker, RALConfig(lambda_attn=1.0))
        assert "forward_step" not in vars(engine)
        assert all("forward" not in vars(m) for m in model.modules())      # no instance forward restored
