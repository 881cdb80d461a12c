"""zoomsearch: a long-context perception task with a resolution knob, for GRPO vs RAL (issue #15).

An "image" is an n x n grid of patch tokens (n in {4, 8, 16}: N = 16, 64, 256 visual tokens).
Every patch carries a background code, a position code and noise; a handful of cells hold
objects (a colour and a shape), and ``lures`` cells hold an object whose colour shares the
named colour's *hue* but not its *tone* (colour = hue x tone, code = hue code + tone code), so a
lure matches half of the named code. The number of lures grows with N (N / 8: 2, 8, 32). The
named colour is unique in the grid. Position codes index a fixed 16 x 16 frame (row code +
column code of ``r * 16 // n``), so the same coarse region means the same codes at every n.

    prompt:              <bos> <ask> COLOUR <img> x N <ask> COLOUR
    response ("zoom"):   <look> REGION <ans> SHAPE <eos>      (REGION: the target's quadrant)
    response ("direct"): <ans> SHAPE <eos>                    (the control format)

The question is stated before the image as well as after it (``question_first``; False gives
the issue's ``<bos> <img> x N <ask> COLOUR``). With the question only after the image, the
response rows must first fetch the named colour and then look it up (two hops), and the tiny
model stayed at chance for 800+ warm-up steps even with attention supervision; with it before
the image each visual token can mark itself as a match, and the warm-up leaves chance after a few
hundred steps (~150 at tone_scale 0.8, ~550 at the default 0.4).

Reward: 0.9 * (SHAPE right, at the ``<ans>`` slot) + 0.1 * format. REGION is sampled and not
rewarded: it is a latent "zoom". The SFT warm-up teaches the right quadrant, but in RL a sampled
REGION only matters through the answer that follows it. Because REGION is sampled, the ``<ans>``
row (the row that predicts SHAPE) has a prefix that differs within a GRPO group, so RAL's term
sum_i A_i * JSD_i does not cancel there. In the direct format every sample of a group shares the
``<ans>`` row's prefix (prompt + ``<ans>``), and for the token-level loss types
sum_i A_i * JSD_i = JSD * sum_i A_i = 0 at that row: RAL cannot act on the decisive attention
(``tests/test_zoomsearch.py`` checks this).

The model is ``ral.tasks.grounding.TinyVLM`` (projector + tiny Qwen2 from a config; default 3
layers, width 64). ``ZoomSearchTask.sft_task()`` is the warm-up task: the same format, with the
grid size drawn per batch from ``sft_grids`` (so positions up to N = 256 are seen in SFT; batches
above N = 64 are shrunk to about the same token count).

``ZoomTrainer`` is ``ral.trainer.RALTrainer`` plus the issue's diagnostics and controls:

- metrics per step (rollout batch, old weights): target mass of the last layer's attention
  policy (head mean, self excluded, renormalised: the paper's) at the ``<look>`` and ``<ans>``
  rows, the best single head's target mass there, the within-group dispersion of the ``<ans>``
  row's policy (generalised JSD: H(mean_i p_i) - mean_i H(p_i), nats), the fraction of groups
  whose samples chose more than one REGION, and every ``ratio_every`` steps the ratio
  ||grad(lambda * L_attn)|| / ||grad(L_RL)|| on the last minibatch of the step;
- ``attn_control="shuffle"``: L_attn with the advantages permuted within each group (the RL
  term keeps the true ones);
- ``attn_control="oracle"``: the lambda term is -log(target mass) of the current attention
  policy at the ``<look>`` and ``<ans>`` rows (the positive control; it uses the answer's
  location, which RL never sees).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from dataclasses import asdict, dataclass
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from tqdm.auto import tqdm

from ...checks import check_choice
from ...integrations.models import language_model
from ...integrations.transformers import AttentionPolicy, _sdpa_plain
from ...losses import attention_policy_loss
from ..diagnostics import policy_entropy, row_policy
from ..trainer import RALTrainer, TrainConfig, atomic_save, evaluate, token_logps
from .grounding import BOS, EOS, IMG, PAD, PromptBatch, TinyModelConfig, TinyVLM

__all__ = ["ZoomConfig", "ZoomSearchTask", "ZoomPrompts", "ZoomTrainer", "zoom_attention_metrics",
           "add_zoom_arguments", "cmd_train", "FORMATS", "CONTROLS"]

FORMATS = ("zoom", "direct")
CONTROLS = ("none", "shuffle", "oracle")

# token ids (PAD, BOS, EOS, IMG shared with the grounding task: TinyVLM places visual tokens at IMG)
ASK, ANS, LOOK = 4, 5, 6
_FIRST_REGION = 7
N_REGIONS = 4                       # quadrants: 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right
_FIRST_COLOUR = _FIRST_REGION + N_REGIONS
FRAME = 16                          # position codes index a 16 x 16 frame


@dataclass
class ZoomConfig(TinyModelConfig):
    """Task and model sizes (``vocab_size`` / ``max_positions`` are read by ``TinyVLM``; the model's
    other sizes are ``TinyModelConfig``'s, with 3 layers)."""

    grid: int = 8                               # n: N = n * n visual tokens (n divides 16)
    fmt: str = "zoom"                           # "zoom" or "direct" (the control format)
    n_hues: int = 4
    n_tones: int = 2                            # colours = hues x tones
    n_shapes: int = 6
    n_objects: int = 4                          # objects with distinct colours, the target first
    lures_per_cell: float = 1 / 8               # lures = max(1, round(N * this)): 2, 8, 32
    tone_scale: float = 0.4                     # norm scale of the tone code (what separates a lure)
    sft_grids: Tuple[int, ...] = (4, 8, 16)     # the warm-up draws a grid size per batch
    sft_grid_weights: Tuple[float, ...] = (0.6, 0.3, 0.1)
    question_first: bool = True                 # also state ASK COLOUR before the image (see module doc)
    layers: int = 3
    max_positions: int = 320

    @property
    def n_colours(self) -> int:
        return self.n_hues * self.n_tones

    @property
    def vocab_size(self) -> int:
        return _FIRST_COLOUR + self.n_colours + self.n_shapes

    @property
    def cells(self) -> int:
        return self.grid * self.grid

    @property
    def lures(self) -> int:
        return max(1, round(self.cells * self.lures_per_cell))


@dataclass
class ZoomPrompts(PromptBatch):
    """A batch of prompts: input_ids / attention_mask (B, P), cell_features (B, N, F), and per
    prompt the target cell, its REGION token and the answer (SHAPE token), each (B,)."""

    input_ids: Tensor
    attention_mask: Tensor
    cell_features: Tensor
    target_cell: Tensor
    region: Tensor
    answer: Tensor


class ZoomSearchTask:
    """Samples prompts, scores responses, gives the SFT targets and the diagnostic rows.

    The codes (hues, tones, shapes, background, positions) are fixed by ``feature_seed`` and
    shared by every grid size, format and run.
    """

    eos_token_id = EOS
    pad_token_id = PAD

    def __init__(self, cfg: Optional[ZoomConfig] = None, feature_seed: int = 4321, **overrides):
        cfg = cfg or ZoomConfig()
        if overrides:
            cfg = ZoomConfig(**{**asdict(cfg), **overrides})
        check_choice("fmt", cfg.fmt, FORMATS)
        if not isinstance(cfg.grid, int) or cfg.grid < 2 or FRAME % cfg.grid:
            raise ValueError(f"grid must be an even divisor of {FRAME}, got {cfg.grid}")
        self.cfg = cfg
        g = torch.Generator().manual_seed(feature_seed)
        f = cfg.feature_dim
        self.hue_codes = torch.randn(cfg.n_hues, f, generator=g)
        self.tone_codes = torch.randn(cfg.n_tones, f, generator=g) * cfg.tone_scale
        self.shape_codes = torch.randn(cfg.n_shapes, f, generator=g)
        self.background = torch.randn(f, generator=g) * 0.5
        self.row_codes = torch.randn(FRAME, f, generator=g) * 0.5
        self.col_codes = torch.randn(FRAME, f, generator=g) * 0.5
        self.feature_seed = feature_seed
        self.max_new_tokens = 5 if cfg.fmt == "zoom" else 3

    @property
    def name(self) -> str:
        return "zoomsearch" if self.cfg.fmt == "zoom" else "zoomsearch-direct"

    def build_model(self) -> TinyVLM:
        """``TinyVLM`` whose COLOUR / SHAPE token embeddings start as the projector's image of the
        colour (hue + tone) / shape codes: the text-vision alignment a pretrained VLM brings
        (the embeddings are tied with the LM head, so a SHAPE logit reads the projected code)."""
        model = TinyVLM(self.cfg)
        c = self.cfg
        colours = torch.arange(c.n_colours)
        with torch.no_grad():
            emb = model.lm.get_input_embeddings().weight
            colour_vec = model.projector(self.hue_codes[colours // c.n_tones] + self.tone_codes[colours % c.n_tones])
            shape_vec = model.projector(self.shape_codes)
            emb[self.colour_token(0):self.colour_token(c.n_colours)] = colour_vec
            emb[self.shape_token(0):self.shape_token(c.n_shapes)] = shape_vec
        return model

    def config_dict(self) -> dict:
        return asdict(self.cfg)

    def with_grid(self, grid: int) -> "ZoomSearchTask":
        return ZoomSearchTask(self.cfg, self.feature_seed, grid=grid)

    def sft_task(self) -> "_MixedGrids":
        """The warm-up task: this format, a grid size from ``sft_grids`` drawn per batch."""
        return _MixedGrids(self)

    # -- tokens -------------------------------------------------------------------------------
    def colour_token(self, c):
        return _FIRST_COLOUR + c

    def shape_token(self, s):
        return _FIRST_COLOUR + self.cfg.n_colours + s

    # -- prompts ------------------------------------------------------------------------------
    def sample(self, n: int, generator: torch.Generator) -> ZoomPrompts:
        """n prompts at this grid size (see the module doc)."""
        c = self.cfg
        cells, k, lures = c.cells, c.n_objects, c.lures
        rows = torch.arange(n)[:, None]
        place = torch.rand(n, cells, generator=generator).argsort(1)[:, :k + lures]   # target, objects, lures
        colours = torch.rand(n, c.n_colours, generator=generator).argsort(1)[:, :k]    # distinct; [:, 0] named
        hue, tone = colours[:, :1] // c.n_tones, colours[:, :1] % c.n_tones
        other_tone = (tone + torch.randint(1, c.n_tones, (n, lures), generator=generator)) % c.n_tones
        lure_colours = hue * c.n_tones + other_tone                                    # same hue, other tone
        obj_colours = torch.cat([colours, lure_colours], 1)                            # (n, k + lures)
        shapes = torch.randint(0, c.n_shapes, (n, k + lures), generator=generator)

        r = torch.arange(cells) // c.grid * (FRAME // c.grid)
        q = torch.arange(cells) % c.grid * (FRAME // c.grid)
        pos = self.row_codes[r] + self.col_codes[q]                                    # (N, F)
        feats = self.background + pos + c.feature_noise * torch.randn(n, cells, c.feature_dim, generator=generator)
        obj = (self.hue_codes[obj_colours // c.n_tones] + self.tone_codes[obj_colours % c.n_tones]
               + self.shape_codes[shapes] - self.background)
        feats[rows, place] += obj

        target = place[:, 0]
        tr, tc = target // c.grid, target % c.grid
        region = _FIRST_REGION + 2 * (tr >= c.grid // 2).long() + (tc >= c.grid // 2).long()
        answer = self.shape_token(shapes[:, 0])
        question = torch.cat([torch.full((n, 1), ASK), self.colour_token(colours[:, :1])], dim=1)
        head = [torch.full((n, 1), BOS)] + ([question] if c.question_first else [])
        ids = torch.cat(head + [torch.full((n, cells), IMG), question], dim=1)
        return ZoomPrompts(ids, torch.ones_like(ids), feats, target, region, answer)

    # -- positions ----------------------------------------------------------------------------
    def image_start(self) -> int:
        return 3 if self.cfg.question_first else 1

    def prompt_length(self) -> int:
        return self.cfg.cells + self.image_start() + 2

    def target_positions(self, prompts: ZoomPrompts) -> Tensor:
        """(B,) sequence position of the target cell's visual token."""
        return self.image_start() + prompts.target_cell

    def rows(self) -> Dict[str, int]:
        """Sequence positions of the diagnostic rows: ``look`` (predicts REGION; zoom format only)
        and ``ans`` (the ``<ans>`` token's row, which predicts SHAPE)."""
        p = self.prompt_length()
        return {"look": p, "ans": p + 2} if self.cfg.fmt == "zoom" else {"ans": p}

    # -- supervision and reward -----------------------------------------------------------------
    def sft_targets(self, prompts: ZoomPrompts) -> Tensor:
        n = prompts.answer.shape[0]
        full = lambda tok: torch.full((n,), tok)  # noqa: E731
        if self.cfg.fmt == "zoom":
            return torch.stack([full(LOOK), prompts.region, full(ANS), prompts.answer, full(EOS)], 1)
        return torch.stack([full(ANS), prompts.answer, full(EOS)], 1)

    def reward(self, completions: Tensor, prompts: ZoomPrompts) -> Dict[str, Tensor]:
        """completions (B, T) -> {"reward", "accuracy", "format", "region_accuracy"} each (B,) float."""
        want = self.max_new_tokens
        if completions.shape[1] < want:
            completions = torch.nn.functional.pad(completions, (0, want - completions.shape[1]), value=PAD)
        tok = completions[:, :want]
        is_shape = (tok >= self.shape_token(0)) & (tok < self.shape_token(self.cfg.n_shapes))
        if self.cfg.fmt == "zoom":
            is_region = (tok[:, 1] >= _FIRST_REGION) & (tok[:, 1] < _FIRST_REGION + N_REGIONS)
            fmt = (tok[:, 0] == LOOK) & is_region & (tok[:, 2] == ANS) & is_shape[:, 3] & (tok[:, 4] == EOS)
            acc = (tok[:, 0] == LOOK) & is_region & (tok[:, 2] == ANS) & (tok[:, 3] == prompts.answer)
            region_acc = (tok[:, 0] == LOOK) & (tok[:, 1] == prompts.region)
        else:
            fmt = (tok[:, 0] == ANS) & is_shape[:, 1] & (tok[:, 2] == EOS)
            acc = (tok[:, 0] == ANS) & (tok[:, 1] == prompts.answer)
            region_acc = torch.zeros_like(acc)
        acc, fmt = acc.float(), fmt.float()
        return {"reward": 0.9 * acc + 0.1 * fmt, "accuracy": acc, "format": fmt,
                "region_accuracy": region_acc.float()}


class _MixedGrids:
    """The SFT warm-up view of a ``ZoomSearchTask``: ``sample`` draws the grid size per call."""

    def __init__(self, task: ZoomSearchTask):
        self.task = task
        self.grids = {g: task.with_grid(g) for g in task.cfg.sft_grids}
        self.weights = torch.tensor(task.cfg.sft_grid_weights, dtype=torch.float)
        self.name = f"{task.name}-mixed"
        self.max_new_tokens, self.eos_token_id, self.pad_token_id = task.max_new_tokens, EOS, PAD

    def sample(self, n: int, generator: torch.Generator) -> ZoomPrompts:
        """n prompts at a drawn grid size; above N = 64 only n * 64 / N of them (at least 8), so a
        batch holds about as many tokens at every size."""
        i = int(torch.multinomial(self.weights, 1, generator=generator))
        task = self.grids[self.task.cfg.sft_grids[i]]
        return task.sample(max(8, n * 64 // task.cfg.cells) if task.cfg.cells > 64 else n, generator)

    def sft_targets(self, prompts):
        return self.task.sft_targets(prompts)

    def reward(self, completions, prompts):
        return self.task.reward(completions, prompts)

    def build_model(self):
        return self.task.build_model()

    def config_dict(self):
        return self.task.config_dict()


# ----------------------------------------------------------------------------------------------
# Attention policy at single rows
# ----------------------------------------------------------------------------------------------

def zoom_attention_metrics(layer_ref, key_padding_mask: Optional[Tensor], task: ZoomSearchTask,
                           prompts: ZoomPrompts, completions: Tensor, group_size: int) -> Dict[str, float]:
    """Diagnostics of the recorded (old) attention policy; see the module doc. Keys:
    ``attn_{row}_target`` (head mean), ``attn_{row}_target_best_head`` for row in look / ans,
    ``attn_ans_dispersion`` (nats), ``attn_ans_entropy``, ``region_diversity``."""
    targets = task.target_positions(prompts)
    idx = torch.arange(targets.shape[0])
    out: Dict[str, float] = {}
    with torch.no_grad():
        for name, row in task.rows().items():
            pi, _ = row_policy(layer_ref.q, layer_ref.k, layer_ref.scale, row, key_padding_mask, "mean")
            out[f"attn_{name}_target"] = float(pi[idx, targets].mean())
            each, _ = row_policy(layer_ref.q, layer_ref.k, layer_ref.scale, row, key_padding_mask, "each")
            out[f"attn_{name}_target_best_head"] = float(each[idx, :, targets].mean(0).max())
            if name == "ans":
                groups = pi.view(-1, group_size, pi.shape[-1])
                out["attn_ans_dispersion"] = float((policy_entropy(groups.mean(1)) - policy_entropy(groups).mean(1)).mean())
                out["attn_ans_entropy"] = float(policy_entropy(pi).mean())
        if task.cfg.fmt == "zoom":
            regions = completions[:, 1].view(-1, group_size)
            out["region_diversity"] = float((regions != regions[:, :1]).any(1).float().mean())
    return out


# ----------------------------------------------------------------------------------------------
# Trainer with the diagnostics and controls
# ----------------------------------------------------------------------------------------------

class _CapturingPolicy(AttentionPolicy):
    """``AttentionPolicy`` that keeps the last chosen layer's post-rotary (q, k, scale) of the last
    compare-mode (or ``capture()``-mode) forward in ``captured``, differentiable: for the oracle
    loss and the attention-supervised warm-up. ``capture()`` runs the layer with plain SDPA."""

    captured: Optional[Tuple[Tensor, Tensor, float]] = None

    @contextlib.contextmanager
    def capture(self):
        with self._active("capture", None, None):
            yield self
        self._attention_mask = None

    def _attend(self, slot, module, query, key, value, scaling, kwargs, layer_mask=None):
        scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
        if self._mode in ("compare", "capture") and slot == len(self.modules) - 1:
            self.captured = (query, key, scale)
        if self._mode == "capture":
            return _sdpa_plain(module, query, key, value, self._key_padding(key), scale).transpose(1, 2).contiguous(), None
        return super()._attend(slot, module, query, key, value, scaling, kwargs, layer_mask)


def target_attention_loss(captured, task: "ZoomSearchTask", prompts: ZoomPrompts,
                          key_padding_mask: Optional[Tensor] = None, rows: Tuple[str, ...] = ("look", "ans")) -> Tensor:
    """-log(target mass) of the attention policy at the task's diagnostic ``rows`` (of look, ans; the
    direct format has only ans), averaged over rows and samples; ``captured`` = (q, k, scale) of the
    last layer from ``_CapturingPolicy``."""
    q, k, scale = captured
    targets = task.target_positions(prompts)
    sel = torch.arange(targets.shape[0])
    chosen = [r for name, r in task.rows().items() if name in rows] or list(task.rows().values())
    losses = [-row_policy(q, k, scale, row, key_padding_mask)[0][sel, targets].clamp_min(1e-12).log().mean()
              for row in chosen]
    return torch.stack(losses).mean()


def zoom_sft(model, task: "ZoomSearchTask", steps: int, lr: float, seed: int, attn_weight: float = 1.0,
             batch_size: int = 64, progress: bool = True, attn_rows: Tuple[str, ...] = ("look",),
             stop_accuracy: Optional[float] = None, check_every: int = 100, check_grid: int = 8) -> Dict[str, float]:
    """The warm-up: teacher-forced NLL of the correct response on ``task.sft_task()`` batches, plus
    ``attn_weight`` x ``target_attention_loss`` at ``attn_rows`` (default: the ``<look>`` row only;
    attention supervision, as grounding data gives a pretrained VLM; the ``<ans>`` row's attention
    is left to the NLL). Same optimiser and loop as ``ral.trainer.sft_warmup``, for at most
    ``steps`` steps; with ``stop_accuracy``, it stops at the first multiple of ``check_every`` where
    greedy accuracy on 128 held-out prompts (seed 20_000, not the eval prompts) at ``check_grid``
    reaches it: "a warm-up to partial accuracy". Returns the final losses and ``sft_steps``."""
    torch.manual_seed(seed)
    sft = task.sft_task()
    policy = _CapturingPolicy(language_model(model), layers=(-1,))
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    gen = torch.Generator().manual_seed(seed)
    nll = attn = torch.zeros(())
    check = task.with_grid(check_grid)
    done = 0
    for _ in tqdm(range(steps), desc="sft", disable=not progress, leave=False):
        prompts = sft.sample(batch_size, gen)
        target = sft.sft_targets(prompts)
        ids = torch.cat([prompts.input_ids, target], 1)
        with policy.capture():
            logits = model(ids, torch.ones_like(ids), **prompts.model_inputs()).logits
        nll = -token_logps(logits, target).mean()
        grid_task = sft.grids[math.isqrt(prompts.cell_features.shape[1])]
        attn = (target_attention_loss(policy.captured, grid_task, prompts, rows=attn_rows) if attn_weight
                else torch.zeros(()))
        opt.zero_grad(set_to_none=True)
        (nll + attn_weight * attn).backward()
        opt.step()
        done += 1
        if stop_accuracy is not None and done % check_every == 0:
            if evaluate(model, check, 128, seed=20_000)["accuracy"] >= stop_accuracy:
                break
            model.train()
    policy.remove()
    return {"sft_loss": float(nll.detach()), "sft_attn_loss": float(attn.detach()), "sft_steps": done}


class ZoomTrainer(RALTrainer):
    """``RALTrainer`` on a ``ZoomSearchTask`` with the zoomsearch diagnostics and controls.

    Args (besides ``RALTrainer``'s): ``attn_control`` in ``CONTROLS`` ("none": RAL / GRPO as
    configured; "shuffle": L_attn with within-group permuted advantages; "oracle": L_attn
    replaced by -log target mass at the look / ans rows); ``ratio_every``: measure the
    gradient-norm ratio every this many steps (0: never; it costs two extra backward passes).
    """

    def __init__(self, model, task: ZoomSearchTask, config, out_dir: str, ref_model=None,
                 attn_control: str = "none", ratio_every: int = 5):
        check_choice("attn_control", attn_control, CONTROLS)
        super().__init__(model, task, config, out_dir, ref_model=ref_model)
        self.policy.remove()
        self.policy = _CapturingPolicy(language_model(model), layers=config.attn_layers, divergence=config.divergence,
                                       backend=config.backend, stats=self.policy.stats,
                                       segment_names=self.policy.segment_names)
        self.attn_control, self.ratio_every = attn_control, ratio_every
        self._minibatch = 0
        self._ratio: Dict[str, float] = {}

    def rollout(self) -> dict:
        batch = super().rollout()
        if self.attn_control == "shuffle":
            g = self.cfg.group_size
            gen = torch.Generator().manual_seed(self.cfg.seed * 104_729 + self.step)
            perm = torch.rand(batch["adv"].numel() // g, g, generator=gen).argsort(1)
            batch["attn_adv"] = torch.gather(batch["adv"].view(-1, g), 1, perm).reshape(-1)
        return batch

    def attention_loss(self, batch, idx, cmp, cmask):
        cfg = self.cfg
        if self.attn_control == "oracle":
            kpm = None if batch["reference"].key_padding_mask is None else batch["reference"].key_padding_mask[idx]
            return target_attention_loss(self.policy.captured, self.task, batch["prompts"].select(idx), kpm)
        adv = batch["attn_adv"] if self.attn_control == "shuffle" else batch["adv"]
        return attention_policy_loss(cmp.div, adv[idx], cmask, loss_type=cfg.loss_type,
                                     max_completion_length=self.task.max_new_tokens)

    def before_backward(self, rl_loss, attn):
        self._minibatch += 1
        per_step = self.cfg.ppo_epochs * math.ceil(self.cfg.prompts_per_step * self.cfg.group_size
                                                   / self.cfg.minibatch_size)
        last = self._minibatch % per_step == 0
        if not (last and self.cfg.lambda_attn and self.ratio_every and self.step % self.ratio_every == 0):
            return
        params = [p for p in self.model.parameters() if p.requires_grad]

        def norm(loss):
            grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
            return math.sqrt(sum(float(g.pow(2).sum()) for g in grads if g is not None))

        n_rl, n_attn = norm(rl_loss), norm(self.cfg.lambda_attn * attn)
        self._ratio = {"grad_norm_rl": n_rl, "grad_norm_attn": n_attn, "grad_ratio": n_attn / max(n_rl, 1e-30)}

    def _attention_diagnostics(self, batch) -> Dict[str, float]:
        ref = batch["reference"]
        return zoom_attention_metrics(ref.layers[-1], ref.key_padding_mask, self.task, batch["prompts"],
                                      batch["comp"], self.cfg.group_size)

    def train_step(self) -> Dict[str, float]:
        self._ratio = {}
        metrics = super().train_step()
        metrics.update(self._ratio)
        return metrics


# ----------------------------------------------------------------------------------------------
# ral train --task zoomsearch
# ----------------------------------------------------------------------------------------------

def add_zoom_arguments(parser) -> None:
    g = parser.add_argument_group("zoomsearch (--task zoomsearch)")
    g.add_argument("--grid", type=int, default=8, help="n: an n x n grid, N = n*n visual tokens (4, 8 or 16)")
    g.add_argument("--format", default="zoom", choices=FORMATS,
                   help="zoom: <look> REGION <ans> SHAPE <eos>; direct (control): <ans> SHAPE <eos>")
    g.add_argument("--attn-control", default="none", choices=CONTROLS,
                   help="shuffle: RAL with advantages permuted within each group; oracle: -log target "
                        "attention mass (weight --lambda-attn) instead of RAL's term")
    g.add_argument("--ratio-every", type=int, default=5, help="gradient-norm ratio every k steps (0: off)")
    g.add_argument("--sft-attn-weight", type=float, default=1.0,
                   help="weight of the warm-up's attention supervision (-log target mass at the look/ans rows)")
    g.add_argument("--sft-stop-accuracy", type=float, default=0.4,
                   help="stop the warm-up (at most --sft-steps) once greedy accuracy at N=64 on held-out "
                        "prompts reaches this (checked every 100 steps; 0: run all steps)")
    g.add_argument("--sft-direct-steps", type=int, default=150,
                   help="direct format: warm-up steps continuing the zoom-format checkpoint of the same seed")


def sft_checkpoint(args, task: ZoomSearchTask) -> Tuple[str, dict]:
    """The cached warm-up checkpoint of ``task``'s format for ``--sft-seed`` (``zoom_sft`` from a
    fresh model; the direct format continues the zoom-format checkpoint of the same seed for
    ``--sft-direct-steps`` steps without attention supervision, so both formats share the lookup
    circuit and neither supervises the ``<ans>`` row's attention). Saved next to the run
    directory with its greedy eval at every grid size."""
    root = os.path.dirname(os.path.abspath(args.out))
    tag = f"s{args.sft_seed}-{args.sft_steps}-w{args.sft_attn_weight:g}-a{args.sft_stop_accuracy:g}"
    path = os.path.join(root, f"sft-{task.name}-{tag}.pt")
    if task.cfg.fmt == "direct":
        path = os.path.join(root, f"sft-{task.name}-{tag}-d{args.sft_direct_steps}.pt")
    if os.path.exists(path):
        return path, torch.load(path, map_location="cpu", weights_only=False)
    model = task.build_model()
    if task.cfg.fmt == "direct":
        _, base = sft_checkpoint(args, ZoomSearchTask(task.cfg, task.feature_seed, fmt="zoom"))
        model.load_state_dict(base["model"])
        info = zoom_sft(model, task, args.sft_direct_steps, args.sft_lr, args.sft_seed + 7_777, 0.0,
                        progress=not args.no_progress)
    else:
        torch.manual_seed(args.sft_seed)
        model = task.build_model()
        info = zoom_sft(model, task, args.sft_steps, args.sft_lr, args.sft_seed, args.sft_attn_weight,
                        progress=not args.no_progress, stop_accuracy=args.sft_stop_accuracy or None)
    evals = {f"n{g * g}": evaluate(model, task.with_grid(g), 256) for g in task.cfg.sft_grids}
    state = {"model": model.state_dict(), "task": task.config_dict(), "eval": evals, "sft": info}
    os.makedirs(root, exist_ok=True)
    atomic_save(state, path)
    return path, state


def cmd_train(args) -> int:
    """``ral train --task zoomsearch``: warm-up (``sft_checkpoint``, cached), then GRPO / RAL / a
    control at ``--grid``. Writes ``config.json`` (with the warm-up model's greedy eval at this grid
    as ``start_eval``), ``metrics.jsonl`` and ``checkpoint.pt`` under ``--out``."""
    import time
    if args.threads:
        torch.set_num_threads(args.threads)
    task = ZoomSearchTask(grid=args.grid, fmt=args.format)
    on = args.method == "ral" or args.attn_control != "none"
    # the config is checked before the warm-up, which takes minutes
    cfg = TrainConfig(steps=args.steps, prompts_per_step=args.prompts_per_step, group_size=args.group_size,
                      ppo_epochs=args.ppo_epochs, minibatch_size=args.minibatch_size, lr=args.lr, beta=args.beta,
                      epsilon_low=args.epsilon, epsilon_high=args.epsilon_high, loss_type=args.loss_type,
                      temperature=args.temperature, lambda_attn=args.lambda_attn if on else 0.0,
                      divergence=args.divergence, backend=args.backend, seed=args.seed,
                      eval_prompts=args.eval_prompts, eval_every=args.eval_every,
                      extra={"method": args.method, "task": task.name})
    sft_path, sft = sft_checkpoint(args, task)
    cfg.extra["sft_checkpoint"] = sft_path
    model, ref_model = task.build_model(), task.build_model()
    model.load_state_dict(sft["model"])
    ref_model.load_state_dict(sft["model"])
    start_eval = evaluate(model, task, args.eval_prompts or 256)
    print(f"sft checkpoint {sft_path}; greedy eval at grid {args.grid}: {start_eval}", file=sys.stderr)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump({"method": args.method, "task": task.name, "sft": sft.get("eval"), "start_eval": start_eval,
                   "lambda_attn": cfg.lambda_attn, "task_config": task.config_dict(),
                   **{k: v for k, v in vars(args).items() if k not in ("func", "lambda_attn")}}, f, indent=1)
    trainer = ZoomTrainer(model, task, cfg, args.out, ref_model=ref_model if cfg.beta else None,
                          attn_control=args.attn_control, ratio_every=args.ratio_every)
    t0 = time.time()
    history = trainer.train(progress=not args.no_progress)
    if history:
        print(json.dumps({**history[-1], "wall_s": time.time() - t0}))
    return 0
