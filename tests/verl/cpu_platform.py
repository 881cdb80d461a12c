"""A CPU platform for veRL 0.9.1 (tests only).

veRL 0.9.1 ships platforms for CUDA, ROCm and NPU only and falls back to "nvidia" without an
accelerator, so ``init_device_mesh("cuda")`` fails on a CPU machine. veRL's own
``PlatformRegistry`` takes new platforms; this one maps the device to "cpu" and the collectives
to gloo. Select it with ``VERL_PLATFORM=cpu`` before veRL first asks for its platform.
"""

import contextlib
import types

import torch
from verl.plugin.platform.platform_base import PlatformBase
from verl.plugin.platform.platform_manager import PlatformRegistry


def _cpu_module():
    m = types.SimpleNamespace()
    m.is_available = lambda: True
    m.current_device = lambda: "cpu"
    m.device_count = lambda: 1
    m.set_device = lambda *a, **k: None
    m.synchronize = lambda *a, **k: None
    m.empty_cache = lambda *a, **k: None
    m.manual_seed = torch.manual_seed
    m.manual_seed_all = torch.manual_seed
    m.max_memory_allocated = lambda *a, **k: 0
    m.max_memory_reserved = lambda *a, **k: 0
    m.memory_allocated = lambda *a, **k: 0
    m.memory_reserved = lambda *a, **k: 0
    m.reset_peak_memory_stats = lambda *a, **k: None
    m.mem_get_info = lambda *a, **k: (0, 0)
    m.get_rng_state = torch.get_rng_state
    m.set_rng_state = torch.set_rng_state
    m.Stream = None
    m.get_device_name = lambda *a, **k: "CPU"
    return m


@PlatformRegistry.register("cpu")
class PlatformCPU(PlatformBase):
    device_name = "cpu"
    vendor_name = "cpu"
    device_module = _cpu_module()

    def is_available(self):
        return True

    def current_device(self):
        return "cpu"

    def device_count(self):
        return 1

    def set_device(self, device_index):
        pass

    def synchronize(self, device_index=None):
        pass

    def manual_seed(self, seed):
        torch.manual_seed(seed)

    def manual_seed_all(self, seed):
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings):
        pass

    def empty_cache(self):
        pass

    def get_device_capability(self, device_index=0):
        return (None, None)

    def communication_backend_name(self):
        return "gloo"

    def visible_devices_envvar(self):
        return "CUDA_VISIBLE_DEVICES"

    @contextlib.contextmanager
    def nvtx_range(self, msg):
        yield

    def profiler_start(self):
        pass

    def profiler_stop(self):
        pass

    def ray_resource_name(self):
        return "CPU"

    def ray_noset_envvars(self):
        return []

    def is_ipc_supported(self):
        return False

    def cudart(self):
        return None


def register_cpu_engine():
    """veRL registers its FSDP engines for "cuda" and "npu"; add the same class for "cpu"."""
    from verl.workers.engine.base import EngineRegistry
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead
    registry = EngineRegistry._engines.get("language_model", {})
    if "cpu" not in registry.get("fsdp2", {}):
        EngineRegistry.register(model_type="language_model", backend=["fsdp", "fsdp2"], device="cpu")(FSDPEngineWithLMHead)


# ----------------------------------------------------------------------------------------------
# veRL's Ulysses over SDPA (tests only)
#
# veRL 0.9.1's Ulysses head all-to-all lives only inside flash-attn: apply_monkey_patch replaces
# transformers' ``flash_attention._flash_attention_forward`` with ``_ulysses_flash_attention_forward``
# (all-to-all seq -> heads, all-gather of position_ids, ``_flash_attention_forward``, all-to-all back).
# A model on "sdpa" never reaches it: with ulysses_sequence_parallel_size=2 each rank silently attends
# to its own half of the packed stream only. Without flash-attn (CPU) the model cannot be on
# "flash_attention_2" either. ULYSSES_SDPA is transformers' flash-attention interface (so veRL's
# wrapper runs, all-to-alls included) whose inner ``_flash_attention_forward`` -- the name veRL's
# wrapper calls -- is torch SDPA over the packed sequences that the gathered position ids show.
# ----------------------------------------------------------------------------------------------

ULYSSES_SDPA = "ulysses_sdpa"


def _sdpa_packed_forward(query, key, value, attention_mask, query_length, *args, position_ids=None, is_causal=True,
                         softmax_scale=None, **kwargs):
    """flash-attn's varlen contract on SDPA: (1, S, H, D) packed q / k / v, a sequence starts where
    position_ids is 0; returns (1, S, H, D)."""
    assert query.shape[0] == 1 and attention_mask is None and position_ids is not None
    pos = position_ids.reshape(-1, position_ids.shape[-1])[0]            # the text row of M-RoPE ids
    seq_id = (pos == 0).cumsum(0)
    idx = torch.arange(pos.numel(), device=pos.device)
    allowed = seq_id[:, None] == seq_id[None, :]
    if is_causal:
        allowed &= idx[None, :] <= idx[:, None]
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))           # (1, H, S, D)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=softmax_scale,
                                                           enable_gqa=q.shape[1] != k.shape[1])
    return out.transpose(1, 2)


def register_ulysses_sdpa():
    """Register attention implementation ULYSSES_SDPA and point veRL's Ulysses wrapper at SDPA."""
    from transformers import AttentionInterface
    from transformers.integrations import flash_attention
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask
    from verl.models.transformers import monkey_patch

    monkey_patch._flash_attention_forward = _sdpa_packed_forward
    if flash_attention._flash_attention_forward.__module__ == "transformers.modeling_flash_attention_utils":
        # no veRL patch yet (use_remove_padding off): the same SDPA, without the all-to-alls
        flash_attention._flash_attention_forward = _sdpa_packed_forward
    AttentionInterface.register(ULYSSES_SDPA, flash_attention.flash_attention_forward)
    AttentionMaskInterface.register(ULYSSES_SDPA, flash_attention_mask)
