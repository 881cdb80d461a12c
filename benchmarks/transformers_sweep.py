"""Every causal LM architecture of the installed transformers, built tiny from its config: choose each
softmax-attention decoder layer in turn and compare the logits of ``AttentionPolicy.record`` with
transformers' own "sdpa" implementation on a left-padded batch.

    python benchmarks/transformers_sweep.py                        # ~8 min, one core: benchmarks/out/
    python benchmarks/transformers_sweep.py --models llama,gemma3_text --out /tmp/sweep

Each architecture runs in a forked child (a crash or a hang costs that row only). float64 first; a
model whose own forward refuses float64 (grouped MoE matmuls) runs in float32. Verdicts per row:
"equal" (every layer within 1e-9 in float64, 1e-5 x max |logit| in float32), "refused" (every
differing layer raised a ValueError naming why: what the op does not compute), "DIFFERS" (a chosen
layer changed the model's logits without a word: a bug), or why the model was not run ("build",
"baseline": the tiny config does not suit it; "no causal decoder attention"). Writes
``sweep.jsonl`` and ``sweep.md`` under --out, prints the counts, and exits 1 if a row DIFFERS.
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing as mp
import os
import sys
import time
import traceback
import warnings

SMALL = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=128, pad_token_id=0, bos_token_id=1,
             eos_token_id=2)
# multi-head latent attention (DeepSeek V2 / V3, MiniCPM3): query / key head dim 12, value head dim 6
LATENT = dict(num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6, qk_head_dim=12,
              moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=1, n_group=1,
              topk_group=1)


def sweep_one(name: str) -> dict:
    """One architecture -> its result row (runs in a child process)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ral.integrations.transformers import AttentionPolicy

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    row = {"model": name}
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, SMALL["vocab_size"], (2, 20), generator=gen)
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[0, :3] = 0
    real = mask.bool()
    latent = {k: v for k, v in SMALL.items() if k != "head_dim"} | LATENT
    attempts = [(SMALL, torch.float64), (latent, torch.float64), (SMALL, torch.float32), (latent, torch.float32)]
    model = want = None
    for kwargs, dtype in attempts:
        try:
            cfg = AutoConfig.for_model(name, **kwargs)
            if hasattr(cfg, "get_text_config") and cfg.get_text_config() is not cfg:
                return {**row, "verdict": "skipped", "why": "composite (vision + text) config"}
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").to(dtype).eval()
            with torch.no_grad():
                want = model(input_ids=ids, attention_mask=mask).logits
            break
        except Exception as exc:                     # the tiny config does not suit this architecture
            row["why"] = f"{type(exc).__name__}: {str(exc)[:160]}"
            model = None
    if model is None:
        return {**row, "verdict": "not run"}
    row["dtype"] = str(dtype).replace("torch.", "")
    try:
        n_layers = len(AttentionPolicy(copy.deepcopy(model), backend="reference")._attention_modules)
    except ValueError as exc:
        return {**row, "verdict": "no causal decoder attention", "why": str(exc)[:160]}
    tolerance = 1e-9 if dtype == torch.float64 else 1e-5 * max(1.0, float(want[real].abs().max()))
    layers, verdict = {}, "equal"
    for i in range(n_layers):
        candidate = copy.deepcopy(model)
        policy = AttentionPolicy(candidate, layers=(i,), backend="reference")
        try:
            with torch.no_grad(), policy.record():
                got = candidate(input_ids=ids, attention_mask=mask).logits
            diff = float((got - want)[real].abs().max())
            layers[i] = diff
            if not diff <= tolerance:
                verdict = "DIFFERS"
        except ValueError as exc:
            layers[i] = f"refused: {str(exc)[:200]}"
            verdict = verdict if verdict == "DIFFERS" else "refused"
        except Exception as exc:
            layers[i] = f"{type(exc).__name__}: {str(exc)[:160]} ({traceback.extract_tb(exc.__traceback__)[-1].name})"
            verdict = "DIFFERS"
    row.pop("why", None)
    return {**row, "verdict": verdict, "layers": layers, "tolerance": tolerance}


def _child(name: str, conn) -> None:
    conn.send(sweep_one(name))
    conn.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out",
                                                      "transformers_sweep"))
    parser.add_argument("--models", default="", help="comma-separated model types (default: every causal LM)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per architecture")
    args = parser.parse_args(argv)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import torch  # noqa: F401  (imported once here, shared by the forked children)
    import transformers
    from tqdm.auto import tqdm
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names = [m for m in args.models.split(",") if m] or sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    os.makedirs(args.out, exist_ok=True)
    rows = []
    context = mp.get_context("fork")
    with open(os.path.join(args.out, "sweep.jsonl"), "w") as out:
        for name in tqdm(names, desc="architectures"):
            start = time.time()
            receive, send = context.Pipe(duplex=False)
            child = context.Process(target=_child, args=(name, send))
            child.start()
            send.close()
            try:
                row = receive.recv() if receive.poll(args.timeout) else None
            except EOFError:                         # the child died (a crash inside the model's code)
                row = None
            child.join(5)
            if child.is_alive():
                child.kill()
            if row is None:
                row = {"model": name, "verdict": "not run", "why": f"child exited ({child.exitcode}) or timed out"}
            row["seconds"] = round(time.time() - start, 1)
            rows.append(row)
            out.write(json.dumps(row) + "\n")
            out.flush()
    counts = {}
    for row in rows:
        counts[row["verdict"]] = counts.get(row["verdict"], 0) + 1
    with open(os.path.join(args.out, "sweep.md"), "w") as md:
        md.write(f"transformers {transformers.__version__}: {len(rows)} causal LM architectures, {counts}\n\n")
        md.write("| model | dtype | verdict | per layer: max abs logit difference, or why |\n|---|---|---|---|\n")
        for row in rows:
            detail = row.get("layers") or row.get("why", "")
            md.write(f"| {row['model']} | {row.get('dtype', '')} | {row['verdict']} | {detail} |\n")
    print(f"transformers {transformers.__version__}: {counts}")
    for row in rows:
        if row["verdict"] in ("DIFFERS", "refused"):
            print(row["model"], row["verdict"], row["layers"])
    return 1 if counts.get("DIFFERS") else 0


if __name__ == "__main__":
    sys.exit(main())
