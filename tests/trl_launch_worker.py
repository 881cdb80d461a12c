"""One process of ``accelerate launch --cpu --num_processes N tests/trl_launch_worker.py OUT``
(tests/test_trl_launch.py): RALGRPOTrainer runs on the tiny Qwen2 of tests/test_trl.py with a fixed
global batch of 8 completions per step, however many processes share it, and rank 0 saves the
trained parameters and the logged metrics of each run to OUT/<run>.pt.

Completions come from a rollout function (TRL's ``rollout_func``) that is a pure function of the
prompt and of the sample's place in its group, so 1 and N processes train on the same tokens; the
reward (count of 'a') varies within a group, so advantages and the attention term are nonzero.
"""

import os
import sys
import zlib
from pathlib import Path

import torch
from accelerate import PartialState

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
from test_trl import WORDS, config, count_a, dataset, saved_qwen2, tokenizer  # noqa: E402  (the initial checkpoint is written by the test before launching)

from ral.integrations.trl import RALGRPOTrainer  # noqa: E402

GLOBAL_BATCH = 8
GENERATIONS = 4
LAMBDA = 50.0  # large, so that the attention term's share of the SGD update stands far above float noise
RUNS = {  # name: (loss_type, lambda_attn)
    "grpo_ral": ("grpo", LAMBDA),
    "dapo_ral": ("dapo", LAMBDA),
    "grpo_plain": ("grpo", 0.0),
}


def fixed_rollout(prompts, trainer):
    """TRL rollout_func: the completion of global sample j is drawn from a generator seeded by its
    prompt and j mod num_generations (the process slices are contiguous in the global batch)."""
    tok = trainer.processing_class
    first = trainer.accelerator.process_index * len(prompts)
    prompt_ids, completion_ids = [], []
    for i, prompt in enumerate(prompts):
        place = (first + i) % trainer.num_generations
        gen = torch.Generator().manual_seed(zlib.crc32(prompt.encode()) * 16 + place)
        length = int(torch.randint(2, 7, (1,), generator=gen))
        words = torch.randint(3, len(WORDS), (length,), generator=gen)
        words[torch.rand(length, generator=gen) < 0.35] = WORDS.index("a")
        ids = [int(w) for w in words]
        if length < 6:
            ids.append(tok.eos_token_id)
        prompt_ids.append(tok(prompt)["input_ids"])
        completion_ids.append(ids)
    return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": None}


def main(out: str) -> None:
    torch.set_num_threads(1)
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    for name, (loss_type, lam) in RUNS.items():
        cfg = config(os.path.join(out, name), per_device_train_batch_size=GLOBAL_BATCH // processes,
                     num_generations=GENERATIONS, loss_type=loss_type, max_steps=3, optim="sgd", learning_rate=0.5,
                     model_init_kwargs={"dtype": torch.float32})
        state = PartialState()
        trainer = RALGRPOTrainer(model=saved_qwen2(Path(out).parent / "init"), reward_funcs=count_a, args=cfg,
                                 train_dataset=dataset(), processing_class=tokenizer(), rollout_func=fixed_rollout,
                                 lambda_attn=lam, attn_backend="cpu")
        trainer.train()
        if state.is_main_process:
            model = trainer.accelerator.unwrap_model(trainer.model)
            torch.save({"params": {k: v.detach().clone() for k, v in model.named_parameters()},
                        "logs": [h for h in trainer.state.log_history if "loss" in h],
                        "processes": state.num_processes}, os.path.join(out, f"{name}.pt"))
        state.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1])
