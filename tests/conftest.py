import os
import sys

import pytest
import torch

# tests/oracle.py is imported by the backend tests as `oracle`
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _route_cpu_kernels_to_forced_lanes() -> None:
    """RAL_TEST_CPU_LANES=N (tests/test_cpu_lanes.py sets it in a pytest process of its own): the cpu
    backend's kernels are the RAL_CPU_LANES=N build of tests/cpu_lanes.py for the whole session."""
    lanes = os.environ.get("RAL_TEST_CPU_LANES")
    if not lanes:
        return
    import cpu_lanes
    from ral.backends import compiled
    module = cpu_lanes.load(int(lanes))
    assert module.cpu_lanes == int(lanes), (module.cpu_lanes, lanes)
    compiled._C = module


_route_cpu_kernels_to_forced_lanes()


@pytest.fixture
def one_thread():
    """Tiny models: one intra-op thread is fastest, and the CI cores are shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
