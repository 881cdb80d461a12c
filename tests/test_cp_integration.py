"""AttentionPolicy(cp_group=...): a model on sequence shards over 2 gloo processes equals one process.

A tiny random 1-layer Qwen2: its one decoder layer is the chosen one, and everything else in the
model is per token, so running the whole model on a rank's shard of the sequence (with the shard's
global position ids) is exact. Every spawned process runs the same script twice, on one process's
whole sequence (cp_group=None) and on its shard (cp_group=WORLD): record at the initial weights,
perturb the weights, compare with a row mask and key segments (div, entropy, mass in the loss),
backward, then observe. A left-padded batch of 2 with S = 23 (not divisible by 2P = 4), so rank
shards differ in length and one rank's shard of the mask has no padding. Each rank checks its rows of
the logits (record and compare), div, entropy and mass (compare and observe) against the same rows
of the single-process run, and the parameter gradients summed over ranks (the per-rank loss is the
sum over its rows, the single-process loss over all rows) against the single-process gradients:
in float64 (the reference backend) up to summation order (and the float32 rounding of the recorded
reference stats for div and the gradients), and for the cpu kernels in float32 under the accuracy
rule of tests/oracle.py against the float64 single-process run. Calls that every rank must refuse
together (no position ids, shards in another layout) and, on a one-process group, packed calls and
whole-sequence row masks are checked too.
"""

import copy

import pytest
import torch
import torch.distributed as dist

from oracle import FLOOR, _err
from ral import backends
from ral.distributed import GatheredKeys, shard
from ranks import run_ranks

transformers = pytest.importorskip("transformers")

from ral.integrations.transformers import AttentionPolicy  # noqa: E402

SEQ = 23
VOCAB = 64
NAMES = ("prompt", "response")


def _model(dtype, layers=1, **config):
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **config)
    return transformers.Qwen2ForCausalLM(cfg).to(dtype)


PACKED = (7, 10, 6)      # one packed row of three sequences; they straddle the ranks' chunks


def _batch(packed=False):
    """ids, the left-padded 2-D mask, position ids, response rows, key segments (0 prompt,
    1 response) and float64 upstream weights for logits, div, entropy and mass. packed: the first
    row as one packed row of the sequences PACKED, without a mask (position ids restart)."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=gen)
    mask = torch.ones(2, SEQ, dtype=torch.long)
    mask[0, :5] = 0
    mask[1, :2] = 0
    rows = torch.zeros(2, SEQ, dtype=torch.bool)
    rows[0, 14:] = True
    rows[1, 9:] = True
    weights = [torch.randn(shape, generator=gen, dtype=torch.float64)
               for shape in ((2, SEQ, VOCAB), (2, SEQ), (2, SEQ), (2, SEQ, len(NAMES)))]
    if packed:
        positions = torch.cat([torch.arange(n) for n in PACKED])[None]
        return ids[:1], None, positions, rows[:1], rows[:1].long(), [w[:1] for w in weights]
    return ids, mask, torch.arange(SEQ)[None], rows, rows.long(), weights


def _script(dtype, backend, group, layout, packed):
    """Record, perturb, compare + backward, observe: ({name: this rank's rows}, [parameter gradients
    summed over the group]). group None: one process on the whole sequence."""
    model = _model(dtype)
    policy = AttentionPolicy(model, backend=backend, segment_names=NAMES, cp_group=group, cp_layout=layout)

    def local(t):
        return t if group is None or t is None else shard(t, 1, group, layout)

    ids, mask, positions, rows, segments, weights = _batch(packed)
    call = dict(input_ids=local(ids), attention_mask=local(mask), position_ids=local(positions))
    with torch.no_grad(), policy.record() as rec:
        recorded = model(**call).logits
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen, dtype=torch.float64).to(dtype))
    with policy.compare(rec.reference, row_mask=local(rows), key_segments=local(segments)) as cmp:
        # under cp_group the reference keys' all-gather is in flight before the model runs
        assert group is None or (len(policy._prefetched) == 1 and
                                 isinstance(policy._prefetched[0], GatheredKeys)), policy._prefetched
        logits = model(**call).logits
    got = dict(recorded=recorded, logits=logits, div=cmp.div, entropy=cmp.entropy, mass=cmp.mass)
    loss = sum((got[name].double() * local(w)).sum() for name, w in zip(("logits", "div", "entropy", "mass"), weights))
    loss.backward()
    with torch.no_grad(), policy.observe(row_mask=local(rows), key_segments=local(segments)) as obs:
        model(**call)
    got.update(observed_entropy=obs.entropy, observed_mass=obs.mass)
    grads = [p.grad.double() for p in model.parameters()]
    if group is not None:
        for g in grads:
            dist.all_reduce(g, group=group)
    return {name: t.detach().double() for name, t in got.items()}, grads


def _cp_case(layout, backend, dtype_name, packed):
    """One rank's report: its rows and the summed gradients against the single-process run."""
    dtype = getattr(torch, dtype_name)
    group = dist.group.WORLD
    mine, mine_grads = _script(dtype, backend, group, layout, packed)
    single, single_grads = _script(dtype, backend, None, layout, packed)
    oracle, oracle_grads = ((single, single_grads) if dtype == torch.float64
                            else _script(torch.float64, "reference", None, layout, packed))
    pairs = [(name, mine[name], shard(single[name], 1, group, layout), shard(oracle[name], 1, group, layout),
              single[name]) for name in mine]
    pairs += [(f"grad{i}", got, one, want, one)
              for i, (got, one, want) in enumerate(zip(mine_grads, single_grads, oracle_grads))]
    report = []
    for name, got, one, want, whole in pairs:
        scale = max(float(want.abs().max()), 1e-3)
        if dtype == torch.float64:       # the same math on the same rows: summation order only, but
            # the recorded reference stats are float32 whatever the input (docs/design.md), each run
            # rounds its own, and div (so the gradient) is taken against them: float32 stats accuracy
            bound = (1e-6 if name == "div" or name.startswith("grad") else 1e-9) * scale
            ok = _err(got, one) <= bound
        else:  # float32 kernels: the accuracy rule vs float64, with the single process's own error
            bound = 2.0 * _err(one, want) + FLOOR[dtype] * scale
            ok = _err(got, want) <= bound
        ok = ok and bool(whole.abs().max() > 0)     # every checked quantity is nonzero somewhere
        case = f"{layout}/{dtype_name}{'/packed' if packed else ''}/{name}"
        report.append(f"{case}:{'ok' if ok else 'FAIL'}:{_err(got, one):.3g}:{bound:.3g}")
    return report


def _bad_calls(layout, group):
    """Calls every rank must refuse with the same ValueError (none left waiting in a collective):
    no position ids (RoPE would see the shard's own 0 .. S_r - 1), and shards in another layout."""
    model = _model(torch.float64)
    policy = AttentionPolicy(model, backend="reference", cp_group=group, cp_layout=layout)
    ids, mask, *_ = _batch()
    other = "contiguous" if layout == "zigzag" else "zigzag"

    def sharded(which, **extra):
        return dict(input_ids=shard(ids, 1, group, which), attention_mask=shard(mask, 1, group, which), **extra)

    calls = {"own-positions": (sharded(layout), "each rank's own 0 .. S_r - 1"),
             "other-layout": (sharded(other, position_ids=shard(torch.arange(SEQ)[None], 1, group, other)),
                              "cp_group: the ranks' shards")}
    report = []
    for name, (call, message) in calls.items():
        try:
            with torch.no_grad(), policy.record():
                model(**call)
            report.append(f"{layout}/{name}:FAIL:no-error")
        except ValueError as e:
            report.append(f"{layout}/{name}:{'ok' if message in str(e) else 'FAIL:' + repr(str(e))}")
    return report


def _cp_cases(variants):
    """One rank's reports for every (layout, backend, dtype) variant, and the bad calls per layout
    (one spawn for all: starting processes that import transformers is most of the time)."""
    report = []
    for variant in variants:
        report += _cp_case(*variant)
    for layout in sorted({variant[0] for variant in variants}):
        report += _bad_calls(layout, dist.group.WORLD)
    return report


def test_policy_on_two_ranks_equals_one_process(tmp_path):
    """float64 (reference backend) in both layouts, padded and packed; float32 cpu kernels (zigzag)
    when ral._C is built."""
    variants = [(layout, "reference", "float64", packed) for layout in ("zigzag", "contiguous")
                for packed in (False, True)]
    if backends.unavailable_reason("cpu") is None:
        variants += [("zigzag", "cpu", "float32", False), ("zigzag", "cpu", "float32", True)]
    run_ranks(tmp_path, 2, "policy", _cp_cases, variants)


def test_cp_group_needs_torch_distributed():
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="cp_group: context parallelism needs an initialised"):
        AttentionPolicy(_model(torch.float32), cp_group=object())
    with pytest.raises(ValueError, match="cp_layout must be one of"):
        AttentionPolicy(_model(torch.float32), cp_layout="ring")


@pytest.fixture
def one_rank(tmp_path):
    """A process group of this process alone (gloo), destroyed afterwards."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store-one'}", rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def test_cp_refuses_bad_calls_on_one_rank(one_rank):
    """Flash-attention packing kwargs, packed rows with B > 1, two packed calls in one record block,
    whole-sequence row masks, references of another call; a packed row with an all-ones mask is packed."""
    model = _model(torch.float64)
    policy = AttentionPolicy(model, backend="reference", cp_group=one_rank)
    ids, mask, _, rows, _, _ = _batch()
    cu = torch.tensor([0, 9, SEQ], dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seq_lens_q: flash-attention packing"), torch.no_grad(), policy.record():
        model(ids[:1], cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=14, max_length_k=14)
    _, _, packed, *_ = _batch(packed=True)
    with pytest.raises(ValueError, match=r"one packed row \(B = 1\)"), torch.no_grad(), policy.record():
        model(ids, position_ids=packed)
    with torch.no_grad(), policy.record() as rec:
        model(ids, attention_mask=mask)
    with pytest.raises(ValueError, match=r"row_mask: under cp_group it is this rank's shard"), \
            policy.compare(rec.reference, row_mask=rows[:, -4:]):
        model(ids, attention_mask=mask)
    with pytest.raises(ValueError, match=r"reference: recorded \(B, S_r\)"), policy.compare(rec.reference):
        model(ids[:, :-1], attention_mask=mask[:, :-1])
    with pytest.raises(ValueError, match=r"attention_mask: batch rows \[0, 1\] pad other keys"), \
            policy.compare(rec.reference):
        model(ids, attention_mask=torch.ones_like(mask))
    with pytest.raises(ValueError, match="record: under cp_group record one packed call per block"), \
            torch.no_grad(), policy.record():
        model(ids[:1], position_ids=packed)
        model(ids[:1], position_ids=packed)
    with torch.no_grad(), policy.record() as rec:         # a mask without padding: still packed, as in one process
        model(ids[:1], attention_mask=torch.ones_like(ids[:1]), position_ids=packed)
    assert rec.reference.packing is not None and rec.reference.key_padding_mask is None
    with torch.no_grad(), policy.record() as rec:
        model(ids[:1])
    with pytest.raises(ValueError, match="reference: recorded on a padded batch, the model call is a packed row"), \
            policy.compare(rec.reference):
        model(ids[:1], position_ids=packed)


def test_cp_sliding_window_layer(one_rank):
    """A sliding-window chosen layer under cp_group: refused when the whole sequence (not the shard) is
    longer than the window; a packed row whose sequences fit runs and gives SDPA's logits per sequence."""
    model = _model(torch.float64, use_sliding_window=True, sliding_window=10, max_window_layers=0)
    policy = AttentionPolicy(model, backend="reference", cp_group=one_rank)
    ids, mask, positions, *_ = _batch()
    with pytest.raises(ValueError, match=rf"sliding_window=10\) and this call has sequences of {SEQ} keys"), \
            torch.no_grad(), policy.record():
        model(ids, attention_mask=mask, position_ids=positions)
    _, _, packed, *_ = _batch(packed=True)
    with torch.no_grad(), policy.record() as rec:
        got = model(ids[:1], position_ids=packed).logits
    assert rec.reference.packing is not None and max(PACKED) == 10
    sdpa = _model(torch.float64, use_sliding_window=True, sliding_window=10, max_window_layers=0)
    sdpa.set_attn_implementation("sdpa")
    with torch.no_grad():
        want = torch.cat([sdpa(part).logits for part in ids[:1].split(PACKED, dim=1)], dim=1)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_cp_chunked_attention_layer(one_rank):
    """A chunked-attention chosen layer (Llama 4) under cp_group: refused when the whole call (not the
    shard) has more key positions than a chunk; within one chunk, SDPA's logits."""
    from test_transformers_integration import llama4_chunked
    torch.manual_seed(0)
    model = llama4_chunked(2)
    sdpa = copy.deepcopy(model)
    sdpa.set_attn_implementation("sdpa")
    policy = AttentionPolicy(model, layers=(0,), backend="reference", cp_group=one_rank)
    ids = torch.randint(0, 64, (2, 12))
    with pytest.raises(ValueError, match="chunked-attention layer .* this call has 12 key positions"), \
            torch.no_grad(), policy.record():
        model(ids, position_ids=torch.arange(12)[None])
    with torch.no_grad(), policy.record():
        got = model(ids[:, :4], position_ids=torch.arange(4)[None]).logits
    torch.testing.assert_close(got, sdpa(ids[:, :4]).logits, rtol=1e-12, atol=1e-12)


def test_cp_bidirectional_layer_mask_refused(one_rank):
    """Gemma 3's VLM under cp_group: the image tokens' bidirectional blocks (token_type_ids) show in the
    model's local mask (a shard keeps its tokens' order) and the call is refused on every rank (context
    parallelism is causal), also on one packed row of two sequences; without them, SDPA's logits."""
    from test_transformers_integration import gemma3_vlm
    torch.manual_seed(0)
    model = gemma3_vlm()
    sdpa = copy.deepcopy(model)
    policy = AttentionPolicy(model, backend="reference", cp_group=one_rank)
    ids = torch.randint(3, 250, (2, 14))
    ids[:, 3], ids[:, 4:8], ids[:, 8] = 261, 260, 262
    mask = torch.ones(2, 14, dtype=torch.long)
    mask[0, :2] = 0
    call = dict(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(2, 3, 28, 28, dtype=torch.float64),
                position_ids=torch.arange(14)[None])
    with pytest.raises(ValueError, match="under cp_group the mask transformers built for decoder layer 1 lets rows "
                                         "of a shard attend to later keys"), torch.no_grad(), policy.record():
        model(**call, token_type_ids=(ids == 260).long())
    with torch.no_grad(), policy.record():
        got = model(**call).logits
    with torch.no_grad():
        want = sdpa(**call).logits
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], rtol=1e-12, atol=1e-12)
    # one packed row of two sequences (position ids restart), the images inside them: refused too
    one = torch.tensor([5, 261, 260, 260, 260, 260, 262])
    packed = torch.cat([one, one])[None]
    with pytest.raises(ValueError, match="lets rows of a shard attend to later keys"), torch.no_grad(), \
            policy.record():
        model(input_ids=packed, pixel_values=call["pixel_values"], position_ids=torch.arange(7).repeat(2)[None],
              use_cache=False, token_type_ids=(packed == 260).long())


def test_cp_asks_the_group_once_per_model_call(one_rank, monkeypatch):
    """Two chosen layers under cp_group: the call's layout (sequence length, packing) is agreed on by
    the group once per model call, not per layer; the logits and div equal the same policy without
    cp_group (on one rank a shard is the whole sequence)."""
    asked = []
    original = AttentionPolicy._cp_call
    monkeypatch.setattr(AttentionPolicy, "_cp_call", lambda self, *a, **k: asked.append(1) or original(self, *a, **k))
    ids, mask, positions, rows, *_ = _batch()
    call = dict(input_ids=ids, attention_mask=mask, position_ids=positions)
    got = {}
    for group in (None, one_rank):
        model = _model(torch.float64, layers=2)
        policy = AttentionPolicy(model, layers=(0, 1), backend="reference", cp_group=group)
        with torch.no_grad(), policy.record() as rec:
            model(**call)
        with torch.no_grad(), policy.compare(rec.reference, row_mask=rows) as cmp:
            logits = model(**call).logits
        got[group is None] = (logits, cmp.div)
    assert len(asked) == 2                      # the record call and the compare call, two chosen layers each
    for one, cp in zip(got[True], got[False]):
        torch.testing.assert_close(cp, one, rtol=1e-12, atol=1e-12)
