"""A counting copy of transformers' SDPA attention under a name of its own: in the integration tests it
stands in for an attention implementation other than sdpa / eager (flash_attention_2 on a GPU)."""

from typing import List


def register_counting_sdpa(name: str = "counted_sdpa") -> List[int]:
    """Register ``name`` in transformers' attention and mask interfaces (SDPA's function and mask) and
    return the list that collects the ``layer_idx`` of every attention call it serves."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    calls: List[int] = []

    def counted(module, *args, **kwargs):
        calls.append(module.layer_idx)
        return sdpa_attention_forward(module, *args, **kwargs)

    AttentionInterface.register(name, counted)
    AttentionMaskInterface.register(name, sdpa_mask)
    return calls
