#!/usr/bin/env python
"""A realistic last layer: peak memory and time of one RAL training step on a transformers Qwen2
model with Qwen2.5-VL-7B's attention shape (hidden 3584, 28 heads, 4 kv heads, head dim 128,
rope theta 1e6) but 2 decoder layers and small vocab / MLP sizes (built from a config: no download).

    python benchmarks/bench_last_layer.py                  # CPU: S=2048, fp32
    python benchmarks/bench_last_layer.py --seq 1024       # a smaller point
    python benchmarks/bench_last_layer.py --device cuda    # GPU: S=16384, bf16
    python benchmarks/bench_last_layer.py --check          # eager's and ral's div agree (tiny model)

One step = the old policy's forward (no grad; it caches the reference attention), the policy's
forward with grad, the GRPO surrogate + lambda * A * JSD(attention) on the response tokens,
backward, AdamW step. Implementations, each in a fresh process (CPU peak = VmHWM above the
resident set once model, optimizer state and inputs exist; GPU = max_memory_allocated above
what is allocated then):

    grpo    the floor: the same step without the attention term; every layer SDPA.
    eager   the paper's way: the last layer runs transformers' eager attention (materialised
            (B, H, S, S) probabilities); the old policy's head-averaged, self-dropped,
            renormalised map (B, S, S) is cached; the policy's map is compared with it by JSD.
            Every other layer SDPA.
    ral     ral.integrations.transformers.AttentionPolicy (attn_implementation "ral"): record
            caches the last layer's q, k and row stats; compare runs ral.ops.attention_kl.

Writes <out>/bench_last_layer_<device>.json / .csv (<out>: benchmarks/out/, git-ignored, unless
--out says otherwise; --out benchmarks/results publishes) and prints a table and the ratios.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import shlex
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import torch  # noqa: E402

import providers as P  # noqa: E402

IMPLS = ("grpo", "eager", "ral")
EAGER_IMPL = "paper_eager_last"

# Qwen2.5-VL-7B's text model: hidden 3584, 28 heads, 4 kv heads (head dim 128), rope theta 1e6.
QWEN25VL_7B_ATTN = dict(hidden_size=3584, num_attention_heads=28, num_key_value_heads=4, rope_theta=1e6)


def build_model(layers: int, vocab: int, intermediate: int, dtype: torch.dtype, device: str, tiny: bool = False):
    import transformers
    shape = dict(dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6) if tiny
                 else QWEN25VL_7B_ATTN)
    rope_theta = shape.pop("rope_theta")
    cfg = transformers.Qwen2Config(vocab_size=vocab, intermediate_size=intermediate, num_hidden_layers=layers,
                                   max_position_embeddings=1 << 17, tie_word_embeddings=False,
                                   rope_parameters={"rope_type": "default", "rope_theta": rope_theta}, **shape)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(cfg).to(device=device, dtype=dtype)
    model.set_attn_implementation("sdpa")
    return model


# ----------------------------------------------------------------------------------------------
# The paper's eager last layer
# ----------------------------------------------------------------------------------------------

class EagerLastLayer:
    """The paper's recipe on a transformers model: the last decoder layer runs eager attention and
    its (B, H, S, S) weights give the head-mean, self-dropped, renormalised map; ``record`` caches
    the old policy's (B, S, S) map, ``compare`` returns JSD(pi_theta || pi_old) per token (B, S)."""

    def __init__(self, model, divergence: str = "jsd"):
        from transformers import AttentionInterface
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
        from transformers.models.qwen2.modeling_qwen2 import eager_attention_forward

        self.divergence = divergence
        self.mode = None
        self.rho = None
        self.div = None
        last = max((m for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int)
                    and hasattr(m, "scaling")), key=lambda m: m.layer_idx)
        last._paper_eager_policy = self          # per model: the registered function is global

        def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
            policy = getattr(module, "_paper_eager_policy", None)
            if policy is None or policy.mode is None:
                return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                              scaling=scaling, **kwargs)
            s_q, s_k = query.shape[2], key.shape[2]
            keep = torch.ones(s_q, s_k, dtype=torch.bool, device=query.device).tril(s_k - s_q)[None, None]
            if attention_mask is not None and attention_mask.dtype == torch.bool:
                keep = keep & attention_mask
            additive = torch.zeros(keep.shape, dtype=query.dtype, device=query.device).masked_fill(
                ~keep, torch.finfo(query.dtype).min)        # the float mask transformers' eager path gets
            out, weights = eager_attention_forward(module, query, key, value, additive, scaling=scaling,
                                                   dropout=dropout)
            pi = P.eager_policy(weights, "mean")
            if policy.mode == "record":
                policy.rho = pi.detach()
            else:
                policy.div = P.eager_divergence(pi, policy.rho, policy.divergence)
            return out, None

        AttentionInterface.register(EAGER_IMPL, attention)
        AttentionMaskInterface.register(EAGER_IMPL, sdpa_mask)
        model.set_attn_implementation(EAGER_IMPL)

    def record(self, model, ids):
        self.mode = "record"
        try:
            return model(ids).logits
        finally:
            self.mode = None

    def compare(self, model, ids):
        self.mode = "compare"
        try:
            logits = model(ids).logits
        finally:
            self.mode = None
        div, self.div = self.div, None
        return logits, div


class RalLastLayer:
    """ral.integrations.transformers.AttentionPolicy on the last layer (record / compare)."""

    def __init__(self, model, divergence: str = "jsd", backend: str = "auto"):
        from ral.integrations.transformers import AttentionPolicy
        self.policy = AttentionPolicy(model, layers=(-1,), divergence=divergence, heads="mean", backend=backend)
        self.reference = None

    def record(self, model, ids):
        with self.policy.record() as rec:
            logits = model(ids).logits
        self.reference = rec.reference
        return logits

    def compare(self, model, ids, row_mask=None):
        with self.policy.compare(self.reference, row_mask=row_mask) as cmp:
            logits = model(ids).logits
        return logits, cmp.div


# ----------------------------------------------------------------------------------------------
# One RAL step
# ----------------------------------------------------------------------------------------------

def token_logprobs(logits, ids):
    """log p(ids[t+1] | ids[:t+1]) for t < S-1 -> (B, S-1), fp32."""
    return torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)


def ral_step(model, opt, attn, impl, ids, response, adv, lam):
    """One GRPO (+ RAL attention term) step. Returns (loss, div mean over the response or None)."""
    with torch.no_grad():
        old_logits = attn.record(model, ids) if attn is not None else model(ids).logits
        old_lp = token_logprobs(old_logits, ids)
        del old_logits
    if impl == "ral":
        logits, div = attn.compare(model, ids, row_mask=response)
    elif impl == "eager":
        logits, div = attn.compare(model, ids)
    else:
        logits, div = model(ids).logits, None
    lp = token_logprobs(logits, ids)
    del logits
    mask = response[:, 1:].float()
    ratio = torch.exp(lp - old_lp)
    loss = -(adv[:, None] * ratio * mask).sum() / mask.sum()
    div_mean = None
    if div is not None:
        rows = response.float()
        loss = loss + lam * (adv[:, None] * div * rows).sum() / rows.sum()
        div_mean = float((div.detach() * rows).sum() / rows.sum())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach()), div_mean


def make_batch(batch, seq, vocab, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen).to(device)
    response = torch.zeros(batch, seq, dtype=torch.bool)
    response[:, seq // 2:] = True                         # the second half is the response
    adv = torch.where(torch.arange(batch) % 2 == 0, 1.0, -1.0)
    return ids, response.to(device), adv.to(device)


def worker(opts: dict) -> dict:
    device, impl = opts["device"], opts["impl"]
    dtype = getattr(torch, opts["dtype"])
    if opts.get("threads"):
        torch.set_num_threads(opts["threads"])
    model = build_model(opts["layers"], opts["vocab"], opts["intermediate"], dtype, device)
    attn = EagerLastLayer(model) if impl == "eager" else RalLastLayer(model, backend=opts["backend"]) \
        if impl == "ral" else None
    # foreach=False: per-parameter updates, so the optimizer's temporaries stay small and the
    # step's peak is about the activations (the same AdamW math either way)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=False)
    # warm-up at a tiny S: optimizer state, thread pools, code paths
    ids, response, adv = make_batch(opts["batch"], 32, opts["vocab"], device, seed=1)
    ral_step(model, opt, attn, impl, ids, response, adv, opts["lam"])
    ids, response, adv = make_batch(opts["batch"], opts["seq"], opts["vocab"], device)
    meter = P.meter_for(device)
    meter.start()
    t0 = time.perf_counter()
    try:
        loss, div = ral_step(model, opt, attn, impl, ids, response, adv, opts["lam"])
        P.sync(device)
    except Exception as err:  # noqa: BLE001
        return dict(status="oom" if P.is_oom(err) else "error", note=f"{type(err).__name__}: {str(err)[:200]}")
    dt = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    return dict(status="ok", peak_bytes=meter.peak(), time_s=dt, loss=loss, div_mean=div, params=n_params)


# glibc keeps freed heap blocks inside the process, so a step's RSS peak can count blocks that were
# already free (seen here: +370 MiB for one implementation, depending on allocation order). Serving
# every allocation of 1 MB or more from mmap returns freed blocks at once: the RSS peak then tracks
# live memory. The step's time is not the point of this benchmark.
WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}


def run_isolated(opts: dict, timeout: float) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(opts)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **WORKER_ENV})
    except subprocess.TimeoutExpired:
        return dict(status="timeout", note=f"killed after {timeout:.0f} s")
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        status = "oom" if done.returncode in (-9, 137) else "error"
        return dict(status=status, note=f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(lines[-1])


def check(device: str = "cpu") -> float:
    """eager's and ral's per-token JSD agree on a tiny Qwen2 with a perturbed old policy."""
    import copy
    model = build_model(2, 97, 64, torch.float32, device, tiny=True)
    old = copy.deepcopy(model)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(3)
        for p in old.parameters():
            p.add_(torch.randn(p.shape, generator=gen).to(device) * 0.2)
    ids, response, _ = make_batch(2, 40, 97, device)
    divs = {}
    for impl in ("eager", "ral"):
        m, o = copy.deepcopy(model), copy.deepcopy(old)
        a_new = EagerLastLayer(m) if impl == "eager" else RalLastLayer(m, backend="auto")
        a_old = EagerLastLayer(o) if impl == "eager" else RalLastLayer(o, backend="auto")
        with torch.no_grad():
            a_old.record(o, ids)
        if impl == "eager":
            a_new.rho = a_old.rho
            _, divs[impl] = a_new.compare(m, ids)
        else:
            a_new.reference = a_old.reference
            _, divs[impl] = a_new.compare(m, ids)
    divs = {k: v.detach() for k, v in divs.items()}
    return float((divs["eager"] - divs["ral"]).abs().max()), float(divs["eager"][:, 1:].mean())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seq", type=int, default=None, help="sequence length (default CPU 2048, GPU 16384)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=1024)
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--backend", default="auto", help="ral backend for the ral implementation")
    ap.add_argument("--lam", type=float, default=1.0, help="lambda_attn")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--timeout", type=float, default=900.0, help="per implementation, seconds")
    ap.add_argument("--out", "--out-dir", dest="out_dir", default=os.path.join(HERE, "out"),
                    help="output folder (default benchmarks/out/, git-ignored; --out benchmarks/results publishes)")
    ap.add_argument("--tag", default=None)
    ap.add_argument("--check", action="store_true", help="only check eager vs ral div on a tiny model")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return None
    device = P.pick_device(args.device)
    if args.check:
        diff, mean = check(device)
        print(f"eager vs ral per-token JSD: max |diff| = {diff:.2e} (mean JSD {mean:.4f})")
        return diff
    gpu = device.startswith("cuda")
    opts = dict(device=device, seq=args.seq or (16384 if gpu else 2048), batch=args.batch, layers=args.layers,
                vocab=args.vocab, intermediate=args.intermediate, dtype=args.dtype or P.default_dtype(device),
                backend=args.backend, lam=args.lam, threads=args.threads)
    impls = args.impls.split(",")
    rows = []
    t_start, load_start = time.time(), P.load_average()
    for impl in impls:
        print(f"{impl}: one RAL step at S={opts['seq']} (fresh process) ...", flush=True)
        res = run_isolated(dict(opts, impl=impl), args.timeout)
        rows.append(dict(impl=impl, S=opts["seq"], B=opts["batch"], layers=opts["layers"], H=28, Hkv=4, D=128,
                         hidden=3584, dtype=opts["dtype"], device=device, status=res["status"],
                         peak_bytes=res.get("peak_bytes"), time_s=res.get("time_s"), loss=res.get("loss"),
                         div_mean=res.get("div_mean"), params=res.get("params"), note=res.get("note", ""),
                         **P.versions()))
        gc.collect()
    meta = dict(command="python benchmarks/bench_last_layer.py" + ("" if not sys.argv[1:] else " " + shlex.join(sys.argv[1:])),
                date=datetime.datetime.now().isoformat(timespec="seconds"), opts=opts,
                device_description=P.device_description(device), load_average_start=load_start,
                load_average_end=P.load_average(), wall_s=round(time.time() - t_start, 1),
                model="Qwen2ForCausalLM from a config: hidden 3584, 28 heads, 4 kv heads, head dim 128, "
                      f"{opts['layers']} layers, vocab {opts['vocab']}, intermediate {opts['intermediate']}",
                **P.versions())
    print(f"\n{meta['model']}; B={opts['batch']}, S={opts['seq']}, {opts['dtype']}, {meta['device_description']}")
    print(f"{'impl':>6} {'status':>7} {'extra peak':>12} {'step time':>10} {'div mean':>9}  note")
    for r in rows:
        dm = "-" if r["div_mean"] is None else f"{r['div_mean']:.4f}"
        print(f"{r['impl']:>6} {r['status']:>7} {P.fmt_bytes(r['peak_bytes']):>12} {P.fmt_time(r['time_s']):>10} "
              f"{dm:>9}  {r['note']}")
    by = {r["impl"]: r for r in rows}
    summary = []
    e, r_, g = by.get("eager"), by.get("ral"), by.get("grpo")
    if e and r_ and r_["status"] == "ok":
        if e["status"] == "ok":
            summary.append(f"last layer S={opts['seq']}: extra peak eager/ral = {e['peak_bytes'] / r_['peak_bytes']:.2f}x, "
                           f"step time eager/ral = {e['time_s'] / r_['time_s']:.2f}x")
            if g and g["status"] == "ok":
                summary.append(f"  above the GRPO floor: eager +{P.fmt_bytes(e['peak_bytes'] - g['peak_bytes'])}, "
                               f"ral +{P.fmt_bytes(r_['peak_bytes'] - g['peak_bytes'])}")
        else:
            summary.append(f"last layer S={opts['seq']}: eager {e['status'].upper()}, ral ran with "
                           f"{P.fmt_bytes(r_['peak_bytes'])} extra peak")
    for line in summary:
        print(line)
    os.makedirs(args.out_dir, exist_ok=True)
    stem = args.tag or f"bench_last_layer_{device.split(':')[0]}"
    with open(os.path.join(args.out_dir, stem + ".json"), "w") as fh:
        json.dump(dict(meta=meta, summary=summary, rows=rows), fh, indent=1)
    import csv
    with open(os.path.join(args.out_dir, stem + ".csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {os.path.relpath(os.path.join(args.out_dir, stem))}.json/.csv ({meta['wall_s']:.0f} s)")
    return rows


if __name__ == "__main__":
    main()
