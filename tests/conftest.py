import os
import sys

import pytest
import torch

# tests/oracle.py is imported by the backend tests as `oracle`
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def one_thread():
    """Tiny models: one intra-op thread is fastest, and the CI cores are shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
