"""What the chosen layer's mask check costs (``AttentionPolicy._noncausal_rows``), once per model call,
median of 5: the padded-batch mask transformers hands a chosen layer, (B, 1, S, S) bool, causal over a
key padding, compared with causal attention over the padding; and the same B * S tokens as one packed
row of B sequences (padding-free, ``use_cache=False``), its block-diagonal (1, 1, B * S, B * S) mask
compared within each sequence.

    python benchmarks/bench_mask_check.py [--shapes 8x1024,8x2048,4x4096] [--device cpu|cuda]
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main(argv=None) -> None:
    import transformers

    from ral.integrations.transformers import AttentionPolicy, Packing

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="8x1024,8x2048,4x4096", help="BxS,...")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    cfg = transformers.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2)
    policy = AttentionPolicy(transformers.Qwen2ForCausalLM(cfg))
    print(f"device {args.device}, torch threads {torch.get_num_threads()}")
    for shape in args.shapes.split(","):
        batch, seq = (int(x) for x in shape.split("x"))
        kpm = torch.ones(batch, seq, dtype=torch.bool, device=args.device)
        kpm[::2, :seq // 8] = False                                       # every other row left-padded
        mask = torch.ones(seq, seq, dtype=torch.bool, device=args.device).tril()[None, None] & kpm[:, None, None, :]
        print(f"B={batch} S={seq}: mask {mask.numel() / 2 ** 20:.0f} Mi bools, check "
              f"{_median_ms(policy, args.device, mask, kpm, seq):.1f} ms")
        cu = torch.arange(0, batch * seq + 1, seq, dtype=torch.int32, device=args.device)
        packing = Packing(cu, cu, seq, seq)
        sequence = torch.repeat_interleave(torch.arange(batch, device=args.device), seq)
        mask = (torch.ones(batch * seq, batch * seq, dtype=torch.bool, device=args.device).tril()
                & (sequence[:, None] == sequence[None, :]))[None, None]
        print(f"  packed, {batch} sequences of {seq}: mask {mask.numel() / 2 ** 20:.0f} Mi bools, check "
              f"{_median_ms(policy, args.device, mask, None, batch * seq, packing):.1f} ms")


def _median_ms(policy, device: str, mask, kpm, seq: int, packing=None) -> float:
    times = []
    for _ in range(5):
        policy._mask_checked = None
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        assert policy._noncausal_rows(mask, kpm, seq, seq, packing=packing) is None
        times.append(time.perf_counter() - start)
    return sorted(times)[2] * 1e3


if __name__ == "__main__":
    main()
