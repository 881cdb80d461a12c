"""backend="triton": the Triton kernels (GPU; CPU tensors under TRITON_INTERPRET=1).

Implements the backend interface of ``ral.backends``; importing it needs no GPU, and without
triton installed ``unavailable_reason()`` says why.
"""

from .attention_kl import backward, forward, unavailable_reason, unsupported_reason

__all__ = ["unavailable_reason", "unsupported_reason", "forward", "backward"]
