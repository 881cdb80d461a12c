"""What the chosen layer's mask check costs (``AttentionPolicy._noncausal_rows``): the padded-batch
mask transformers hands a chosen layer (B, 1, S, S) bool, causal over a key padding, compared with
causal attention over the padding, once per model call; median of 5.

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

    from ral.integrations.transformers import AttentionPolicy

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
        times = []
        for _ in range(5):
            policy._mask_checked = None
            if args.device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            assert policy._noncausal_rows(mask, kpm, seq, seq) is None
            times.append(time.perf_counter() - start)
        print(f"B={batch} S={seq}: mask {mask.numel() / 2 ** 20:.0f} Mi bools, check {sorted(times)[2] * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
