"""Backend registry and selection for ``ral.ops.attention_kl``.

A kernel backend is a module with

    unavailable_reason() -> str | None          why it cannot run at all here (None: it can)
    unsupported_reason(call: Call) -> str | None why it cannot take this call (device, dtype, head dim)
    forward(call: Call) -> (out, div, stats, ref_stats_out, gbar, cbar)
    backward(call: Call, dout, ddiv, delta, stats, ref_stats, gbar) -> (dq, dk, dv)

Shapes (all outputs contiguous, allocated by the backend with torch):
    out (B, H, Sq, Dv) in q's dtype, or an empty (0,) tensor when v is None
    div, gbar (B, Sq) for "mean" | (B, H, Sq) for "each", fp32
    stats (B, H, Sq, 2) fp32; ref_stats_out (B, Hr, Sq, 2) fp32, or (0,) when ref_stats was given
    cbar (B, H, Sq) fp32 (zeros for "each")
    dq, dk, dv in the dtypes of q, k, v (dv an empty (0,) tensor when v is None)
The backward's `delta` (B, H, Sq) fp32 is rowsum(dout * out) + w * c_h / H, and `ddiv` (w) is
already 0 on rows with row_mask False or an empty policy support (see ral.ops).

Policy statistics (docs/design.md, "Attention statistics"; call.options.policy_stats): a backend
that computes them returns the six outputs followed by outputs.StatsOutputs (entropy, mass,
cstats), and its backward reads call.key_segments and call.stats_w (then `gbar` is gbar_total and
delta already holds the statistics' c_h terms). Every backend computes them (reference, cpu,
triton, cuda); a new one that does not must say so in unsupported_reason.

Determinism: reference and cpu give the same bits from run to run (cpu: for a given thread count);
a backend whose sums depend on timing (fp32 atomics: cuda's forward and backward, triton's backward)
calls alert_not_deterministic, which follows torch.use_deterministic_algorithms.
"""

from __future__ import annotations

import importlib
import math
import warnings
from typing import Optional

import torch

from .call import Call, Options

BACKENDS = ("auto", "triton", "cuda", "cpu", "reference")

_MODULES = {"cpu": "ral.backends.cpu", "cuda": "ral.backends.cuda", "triton": "ral.backends.triton"}
_HOW_TO_GET = {
    "cpu": "reinstall ral with a C++17 compiler present: pip install -e .",
    "cuda": "reinstall ral on a machine with nvcc (CUDA 12+) and without RAL_SKIP_CUDA_BUILD: pip install -e .",
    "triton": "pip install triton (Linux x86_64), and use CUDA tensors, or set TRITON_INTERPRET=1 for CPU tensors",
}


def alert_not_deterministic(what: str) -> None:
    """PyTorch's rule for a computation without a deterministic implementation, which `what` names:
    under ``torch.use_deterministic_algorithms(True)`` raise RuntimeError (with ``warn_only=True``,
    warn instead); otherwise nothing."""
    if not torch.are_deterministic_algorithms_enabled():
        return
    message = (f"{what} adds fp32 partial sums with atomics, so its last bits may change from run to run; "
               f"torch.use_deterministic_algorithms(True) is set. The cpu backend is deterministic; on a GPU, "
               f"call torch.use_deterministic_algorithms(True, warn_only=True) to run it with this warning.")
    if torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(message, UserWarning, stacklevel=3)
    else:
        raise RuntimeError(message)


def module(name: str):
    """The backend module `name` (imported on first use)."""
    return importlib.import_module(_MODULES[name])


def unavailable_reason(name: str) -> Optional[str]:
    """None when backend `name` can run on this machine, else why not and how to get it."""
    if name == "reference":
        return None
    try:
        reason = module(name).unavailable_reason()
    except ImportError as err:  # e.g. triton not installed
        reason = str(err)
    return None if reason is None else f"{reason}; to get it: {_HOW_TO_GET[name]}"


def available() -> list[str]:
    """Backends that can run on this machine (whatever the device of the tensors)."""
    return [name for name in ("cuda", "triton", "cpu", "reference") if unavailable_reason(name) is None]


def resolve(requested: str, call: Call) -> str:
    """The backend that serves `call`: `requested` if it can, else raise ValueError saying why.

    "auto": CUDA tensors take "cuda" if built and it supports the call, else "triton";
    CPU tensors take "cpu" if built, else "reference"; float64 tensors take "reference"
    (ral.ops sends those to ral.reference before any custom op runs).
    """
    if requested == "reference" or call.q.dtype == torch.float64:
        return "reference"
    if requested == "auto":
        order = ("cuda", "triton") if call.q.is_cuda else ("cpu", "reference")
        reasons = []
        for name in order:
            why = _why_not(name, call)
            if why is None:
                return name
            reasons.append(f"{name}: {why}")
        raise ValueError("backend='auto' found no backend for this call: " + "; ".join(reasons))
    why = _why_not(requested, call)
    if why is not None:
        raise ValueError(f"backend={requested!r} cannot run this call: {why}")
    return requested


def _why_not(name: str, call: Call) -> Optional[str]:
    if name == "reference":
        return None
    why = unavailable_reason(name)
    return why if why is not None else module(name).unsupported_reason(call)


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
