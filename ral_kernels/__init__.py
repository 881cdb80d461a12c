"""Triton kernels of ``ral``: ``backend="triton"`` of ``ral.ops.attention_kl``.

``ral_kernels.attention_kl`` holds the fused attention + divergence kernels and their launchers,
and implements the backend interface of ``ral.backends``. It is imported lazily (by
``ral.backends.module("triton")``) so that importing this package never needs triton.
"""

__all__ = ["attention_kl"]
