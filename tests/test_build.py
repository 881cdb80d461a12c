"""The compiled module: what was built, and that the CUDA entry points fail cleanly without a GPU
(the static CUDA runtime lets ral._C import anywhere; a launch with no driver returns an error
code that the binding turns into a Python error, docs/design.md, "Backends")."""

import shutil

import pytest
import torch

from ral.backends import compiled as _compiled

_C = _compiled._C


def test_compiled_module_is_built():
    assert _compiled.import_error() is None, _compiled.import_error()


def test_cuda_kernels_are_built_where_nvcc_is():
    import os
    if shutil.which("nvcc") is None or os.environ.get("RAL_SKIP_CUDA_BUILD", "0") != "0":
        pytest.skip("no nvcc on PATH (or RAL_SKIP_CUDA_BUILD set): the CUDA kernels are not expected")
    assert _C.has_cuda


def _fake_params():
    """fp16 params with non-null fake addresses: nothing is dereferenced when the device query fails."""
    p = _C.AttentionKLParams()
    p.batch, p.heads, p.kv_heads, p.ref_heads, p.ref_kv_heads = 1, 2, 2, 2, 2
    p.q_len = p.k_len = 17
    p.head_dim = p.ref_head_dim = p.v_head_dim = 64
    p.dtype = p.ref_dtype = 1
    p.has_v = True
    fake = 4096
    for name in ("q", "k", "v", "q_ref", "k_ref"):
        view = _C.View()
        view.ptr = fake
        setattr(p, name, view)
    for name in ("out", "div", "stats", "ref_stats_out", "gbar", "cbar", "dout", "ddiv", "delta", "dq", "dk", "dv"):
        setattr(p, name, fake)
    return p


@pytest.mark.skipif(not getattr(_C, "has_cuda", False) or torch.cuda.is_available(),
                    reason="needs ral._C built with CUDA on a machine without a GPU")
def test_cuda_launch_without_gpu_raises_instead_of_crashing():
    p = _fake_params()
    assert _C.cuda_supports(p)
    with pytest.raises(RuntimeError):
        _C.cuda_forward(p, 0)
    with pytest.raises(RuntimeError):
        _C.cuda_backward(p, 0)


def test_entry_points_recheck_their_params():
    p = _fake_params()
    p.dtype = 0
    p.heads = 3  # not a multiple of kv_heads = 2
    with pytest.raises(ValueError, match="multiple of Hkv"):
        _C.cpu_forward(p)
