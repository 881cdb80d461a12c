"""GRPO + RAL (or on-policy attention distillation) with TRL; runs on 1 CPU or N GPUs.

    # one process (CPU smoke test: a tiny random Qwen2, nothing downloaded)
    python examples/train_trl.py --tiny --max-steps 3

    # 8 GPUs, DeepSpeed ZeRO-2
    accelerate launch --config_file examples/deepspeed_zero2.yaml --num_processes 8 \\
        examples/train_trl.py --model Qwen/Qwen2.5-1.5B-Instruct --lambda-attn 1.0 --bf16

    # on-policy distillation from a larger teacher (token KL + attention JSD)
    accelerate launch --config_file examples/deepspeed_zero2.yaml examples/train_trl.py \\
        --model Qwen/Qwen2.5-0.5B-Instruct --teacher Qwen/Qwen2.5-7B-Instruct --mu 1 --gamma-attn 1 --lambda-attn 0

The dataset is a toy (count the letters of a word); the reward is rule-based. Replace both.
"""
import argparse

import torch
from datasets import Dataset
from trl import GRPOConfig

from ral.integrations.distill import DistillConfig
from ral.integrations.trl import RALGRPOTrainer, checkpointing_config


def tiny_model_and_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
    words = ["<pad>", "<eos>", "<unk>"] + list("abcdefghijklmnopqrstuvwxyz") + [str(i) for i in range(10)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    cfg = Qwen2Config(vocab_size=len(words), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=1)
    return Qwen2ForCausalLM(cfg), tokenizer


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--teacher", default=None)
    p.add_argument("--lambda-attn", type=float, default=1.0)
    p.add_argument("--mu", type=float, default=1.0)
    p.add_argument("--gamma-attn", type=float, default=0.0)
    p.add_argument("--max-steps", type=int, default=100)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--output-dir", default="runs/trl")
    a = p.parse_args()
    if a.tiny:
        model, tokenizer = tiny_model_and_tokenizer()     # in memory: beta = 0 (TRL loads a ref model by name)
        words = ["a b c", "d e", "f g h i", "j k"]
    else:
        from transformers import AutoTokenizer
        model, tokenizer = a.model, AutoTokenizer.from_pretrained(a.model)
        words = ["strawberry", "banana", "attention", "reinforcement"]
    ds = Dataset.from_dict({"prompt": [f"How many letters has {w}? Answer:" if not a.tiny else w for w in words] * 64,
                            "answer": [str(len(w.split()) if a.tiny else len(w)) for w in words] * 64})

    def reward(completions, answer, **_):
        return [1.0 if c.strip().split()[:1] == [ans] else 0.0 for c, ans in zip(completions, answer)]

    args = GRPOConfig(output_dir=a.output_dir, per_device_train_batch_size=8, num_generations=8,
                      max_completion_length=8 if a.tiny else 64, max_steps=a.max_steps, learning_rate=1e-5,
                      beta=0.0 if a.tiny else 0.04, temperature=1.0, num_iterations=2,    # > 1: the attention term needs it
                      logging_steps=1, report_to="none", bf16=a.bf16, use_cpu=not torch.cuda.is_available(),
                      save_strategy="no", **checkpointing_config(not a.tiny))
    teacher, distill = None, None
    if a.teacher:
        from transformers import AutoModelForCausalLM
        teacher = AutoModelForCausalLM.from_pretrained(a.teacher, dtype=torch.bfloat16 if a.bf16 else None)
        distill = DistillConfig(mu=a.mu, gamma_attn=a.gamma_attn)
    trainer = RALGRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=ds,
                             processing_class=tokenizer, lambda_attn=a.lambda_attn, teacher_model=teacher,
                             distill=distill)
    trainer.train()


if __name__ == "__main__":
    main()
