"""The embedded GRPO + RAL trainer, the distillation loop, the tasks and the ``ral`` command line.

The top layer: it imports the integrations (``ral.integrations``) and the op layer, never the reverse.
"""
