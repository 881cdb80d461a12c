"""Integrations with training libraries (transformers; TRL in ``ral.integrations.trl``).

Imported lazily so that ``import ral`` does not import transformers.
"""

__all__ = ["AttentionPolicy", "AttentionReference", "register"]


def __getattr__(name):
    if name in __all__:
        from . import transformers as _tf
        return getattr(_tf, name)
    raise AttributeError(name)
