"""The integration layer: ``transformers`` (AttentionPolicy), ``trl`` (RALGRPOTrainer), ``distill``
(the on-policy distillation loss) and ``models`` (backbone / LM-head glue). Import the submodule you
need; ``import ral`` imports none of them (so neither transformers nor TRL).
"""
