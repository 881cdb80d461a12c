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
