#!/usr/bin/env bash
# GRPO + RAL (lambda_attn * agg(A * JSD) of the last layer's head-mean attention) on Qwen2.5-VL-7B,
# 1 node x 8 GPUs, veRL 0.9.x (pip install "ral[verl]" plus veRL's GPU extras: vllm, flash-attn,
# TransferQueue). NOT runnable on the CPU machine this was written on: untested end to end; the
# worker-level integration it drives is tested on CPU in tests/verl (see README.md here).
#
# Data: veRL's geo3k preprocessing (python -m verl.examples.data_preprocess.geo3k or the script of
# the veRL repo) writes ~/data/geo3k/{train,test}.parquet.
#
# RAL part: the entry point `python -m ral.integrations.verl` (veRL's main_ppo with trainer mode
# ral_sync registered) and the keys +actor_rollout_ref.ral.*; everything else is plain veRL.
# The attention term acts from the second optimizer step on a batch: ppo_mini_batch_size (32 prompts
# x n=5) < train_batch_size (128 prompts) gives 4 steps per batch.
# Reference in the batch: 8,416 B per response token + 1,024 B per prompt/image token (bf16, last
# layer); at 128 x 5 samples x (<=1,024 prompt + <=2,048 response tokens) at most 11.7 GB per step
# in TransferQueue, about 1.5 GB per GPU's share.
set -euxo pipefail

python3 -m ral.integrations.verl \
    algorithm.adv_estimator=grpo \
    algorithm.use_kl_in_reward=False \
    data.train_files="$HOME/data/geo3k/train.parquet" \
    data.val_files="$HOME/data/geo3k/test.parquet" \
    data.train_batch_size=128 \
    data.max_prompt_length=1024 \
    data.max_response_length=2048 \
    data.filter_overlong_prompts=True \
    data.truncation=error \
    data.image_key=images \
    actor_rollout_ref.model.path=Qwen/Qwen2.5-VL-7B-Instruct \
    actor_rollout_ref.model.use_remove_padding=True \
    actor_rollout_ref.model.enable_gradient_checkpointing=True \
    actor_rollout_ref.actor.strategy=fsdp2 \
    actor_rollout_ref.actor.optim.lr=1e-6 \
    actor_rollout_ref.actor.ppo_mini_batch_size=32 \
    actor_rollout_ref.actor.use_dynamic_bsz=True \
    actor_rollout_ref.actor.ppo_max_token_len_per_gpu=16384 \
    actor_rollout_ref.actor.loss_agg_mode=token-mean \
    actor_rollout_ref.actor.use_kl_loss=True \
    actor_rollout_ref.actor.kl_loss_coef=0.01 \
    actor_rollout_ref.actor.kl_loss_type=low_var_kl \
    actor_rollout_ref.actor.entropy_coeff=0 \
    actor_rollout_ref.actor.ulysses_sequence_parallel_size=1 \
    actor_rollout_ref.actor.fsdp_config.param_offload=False \
    actor_rollout_ref.actor.fsdp_config.optimizer_offload=False \
    actor_rollout_ref.rollout.name=vllm \
    actor_rollout_ref.rollout.n=5 \
    actor_rollout_ref.rollout.tensor_model_parallel_size=2 \
    actor_rollout_ref.rollout.gpu_memory_utilization=0.6 \
    actor_rollout_ref.rollout.log_prob_use_dynamic_bsz=True \
    actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu=16384 \
    actor_rollout_ref.ref.log_prob_use_dynamic_bsz=True \
    actor_rollout_ref.ref.log_prob_max_token_len_per_gpu=16384 \
    actor_rollout_ref.ref.fsdp_config.param_offload=True \
    trainer.v1.trainer_mode=ral_sync \
    +actor_rollout_ref.ral.lambda_attn=1.0 \
    '+actor_rollout_ref.ral.layers=[-1]' \
    +actor_rollout_ref.ral.divergence=jsd \
    +actor_rollout_ref.ral.backend=auto \
    trainer.critic_warmup=0 \
    trainer.logger='["console","wandb"]' \
    trainer.project_name=ral_verl \
    trainer.experiment_name=qwen2_5_vl_7b_grpo_ral \
    trainer.n_gpus_per_node=8 \
    trainer.nnodes=1 \
    trainer.save_freq=20 \
    trainer.test_freq=5 \
    trainer.total_epochs=15 "$@"
