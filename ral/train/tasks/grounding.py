"""A synthetic multimodal grounding task whose answer depends on where the model looks.

An "image" is a grid of ``rows x cols`` cells, each with a colour and a shape. A frozen random
"vision encoder" turns every cell into a feature vector (colour + shape + position codes + noise);
a projector maps it into the language model's embedding space, one visual token per cell, in
place of ``<img>`` placeholder tokens (as Qwen2.5-VL does with its merged patches).

The question names one attribute of one cell and asks for the other: "shape of the <colour>
cell?" or "colour of the <shape> cell?". The named value is unique in the grid; the other cells
are distractors that share the asked-for values. The answer format is ``<ans> VALUE <eos>``:

    prompt:   <bos> <img> x N <ask_shape|ask_colour> NAMED_VALUE
    response: <ans> VALUE <eos>

Reward (the paper's recipe): 0.9 * exact match + 0.1 * format (``<ans>``, a value of the asked
kind, ``<eos>``). The model is a tiny Qwen2 built from a config (``TinyVLM``), so everything runs
on a CPU. ``attention_metrics`` measures the last-layer attention policy of the ``<ans>`` row
(the row that predicts the answer): its entropy and its mass on the target cell.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Dict, Optional

import torch
from torch import Tensor, nn
from transformers import Qwen2Config, Qwen2ForCausalLM

from ..diagnostics import attention_metrics  # noqa: F401  (re-exported: the grounding task's diagnostic)

__all__ = ["TinyModelConfig", "GroundingConfig", "GroundingTask", "TinyVLM", "PromptBatch", "Prompts", "attention_metrics"]


@dataclass
class TinyModelConfig:
    """The sizes of ``TinyVLM`` (frozen random patch features -> projector -> a tiny Qwen2), shared
    by the embedded tasks' configs."""

    feature_dim: int = 32
    feature_noise: float = 0.3
    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate_size: int = 128


@dataclass
class GroundingConfig(TinyModelConfig):
    """Task and model sizes. Defaults train in minutes on 2 CPU cores."""

    rows: int = 3
    cols: int = 3
    n_colours: int = 6
    n_shapes: int = 6

    @property
    def cells(self) -> int:
        return self.rows * self.cols


# token ids
PAD, BOS, EOS, IMG, ASK_SHAPE, ASK_COLOUR, ANS = range(7)
_FIRST_VALUE = 7


class PromptBatch:
    """Tensors of a batch of prompts, each with the batch on dim 0 (a dataclass base for the embedded
    tasks' prompt batches; every field is a tensor and ``cell_features`` is one of them)."""

    cell_features: Tensor

    def model_inputs(self) -> Dict[str, Tensor]:
        """Extra keyword arguments of ``TinyVLM.forward`` / ``generate`` besides ids and mask."""
        return {"cell_features": self.cell_features}

    def repeat(self, g: int):
        """Each prompt g times in a row (GRPO groups)."""
        return type(self)(*(getattr(self, f.name).repeat_interleave(g, dim=0) for f in fields(self)))

    def select(self, index):
        """The prompts at ``index`` (an index or mask over dim 0)."""
        return type(self)(*(getattr(self, f.name)[index] for f in fields(self)))


@dataclass
class Prompts(PromptBatch):
    """A batch of prompts. input_ids/attention_mask (B, P); cell_features (B, N, F);
    target_cell (B,) cell index; answer (B,) token id; ask_shape (B,) bool."""

    input_ids: Tensor
    attention_mask: Tensor
    cell_features: Tensor
    target_cell: Tensor
    answer: Tensor
    ask_shape: Tensor


class TinyVLM(nn.Module):
    """Projector + a tiny ``Qwen2ForCausalLM`` (from config). Visual tokens replace ``<img>`` ids.

    ``forward(input_ids, attention_mask, cell_features)`` -> the LM's output (``.logits``
    (B, S, V)); ``generate(...)`` -> only the new tokens (B, T). ``.lm`` is the transformers model
    (attach ``AttentionPolicy`` to it).
    """

    def __init__(self, cfg: GroundingConfig):
        super().__init__()
        self.cfg = cfg
        # other tasks reuse this model: their config may set vocab_size and max_positions
        vocab = getattr(cfg, "vocab_size", None) or _FIRST_VALUE + cfg.n_colours + cfg.n_shapes
        lm_cfg = Qwen2Config(vocab_size=vocab, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                             num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                             num_key_value_heads=cfg.kv_heads, max_position_embeddings=getattr(cfg, "max_positions", 64),
                             bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, tie_word_embeddings=True)
        self.lm = Qwen2ForCausalLM(lm_cfg)
        self.projector = nn.Sequential(nn.Linear(cfg.feature_dim, cfg.hidden_size), nn.GELU(),
                                       nn.Linear(cfg.hidden_size, cfg.hidden_size))

    def embed(self, input_ids: Tensor, cell_features: Tensor) -> Tensor:
        """(B, S) ids + (B, N, F) features -> (B, S, hidden): ``<img>`` slots get projected cells."""
        emb = self.lm.get_input_embeddings()(input_ids)
        is_img = input_ids == IMG
        visual = self.projector(cell_features.to(emb.dtype))
        is_img = is_img & (is_img.cumsum(1) <= visual.shape[1])     # the prompt's N slots, not sampled ones
        if int(is_img.sum()) != visual.shape[0] * visual.shape[1]:
            raise ValueError("input_ids: each row needs N <img> tokens, one per cell")
        return emb.masked_scatter(is_img[..., None], visual.reshape(-1, visual.shape[-1]))

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                cell_features: Optional[Tensor] = None, **kwargs):
        return self.lm(inputs_embeds=self.embed(input_ids, cell_features), attention_mask=attention_mask,
                       use_cache=False, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Tensor, cell_features: Tensor, **kwargs) -> Tensor:
        return self.lm.generate(inputs_embeds=self.embed(input_ids, cell_features), attention_mask=attention_mask,
                                **kwargs)


class GroundingTask:
    """Samples prompts, scores responses, and supervises the SFT warm-up.

    The vision "encoder" (the cell feature codes) is fixed by ``feature_seed`` and shared by
    every run, so that checkpoints stay meaningful.
    """

    name = "grounding"
    max_new_tokens = 3
    eos_token_id = EOS
    pad_token_id = PAD

    def __init__(self, cfg: Optional[GroundingConfig] = None, feature_seed: int = 1234):
        self.cfg = cfg or GroundingConfig()
        g = torch.Generator().manual_seed(feature_seed)
        f = self.cfg.feature_dim
        self.colour_codes = torch.randn(self.cfg.n_colours, f, generator=g)
        self.shape_codes = torch.randn(self.cfg.n_shapes, f, generator=g)
        self.pos_codes = torch.randn(self.cfg.cells, f, generator=g) * 0.5

    def colour_token(self, c):
        return _FIRST_VALUE + c

    def shape_token(self, s):
        return _FIRST_VALUE + self.cfg.n_colours + s

    def build_model(self) -> TinyVLM:
        return TinyVLM(self.cfg)

    def config_dict(self) -> dict:
        return asdict(self.cfg)

    def sample(self, n: int, generator: torch.Generator) -> Prompts:
        """n prompts. The named value is unique in its grid; the rest are random distractors."""
        c = self.cfg
        target = torch.randint(0, c.cells, (n,), generator=generator)
        ask_shape = torch.rand(n, generator=generator) < 0.5
        colours = torch.randint(0, c.n_colours, (n, c.cells), generator=generator)
        shapes = torch.randint(0, c.n_shapes, (n, c.cells), generator=generator)
        rows = torch.arange(n)
        # make the named attribute of the target unique: shift clashing distractors to other values
        named = torch.where(ask_shape, colours[rows, target], shapes[rows, target])
        size = torch.where(ask_shape, torch.full_like(named, c.n_colours), torch.full_like(named, c.n_shapes))
        attr = torch.where(ask_shape[:, None], colours, shapes)
        clash = (attr == named[:, None])
        clash[rows, target] = False
        offset = torch.randint(1, max(c.n_colours, c.n_shapes), (n, c.cells), generator=generator)
        offset = 1 + (offset - 1) % (size[:, None] - 1)
        attr = torch.where(clash, (attr + offset) % size[:, None], attr)
        colours = torch.where(ask_shape[:, None], attr, colours)
        shapes = torch.where(ask_shape[:, None], shapes, attr)

        feats = (self.colour_codes[colours] + self.shape_codes[shapes] + self.pos_codes[None]
                 + c.feature_noise * torch.randn(n, c.cells, c.feature_dim, generator=generator))
        ask_tok = torch.where(ask_shape, torch.full_like(named, ASK_SHAPE), torch.full_like(named, ASK_COLOUR))
        named_tok = torch.where(ask_shape, self.colour_token(colours[rows, target]),
                                self.shape_token(shapes[rows, target]))
        answer = torch.where(ask_shape, self.shape_token(shapes[rows, target]),
                             self.colour_token(colours[rows, target]))
        ids = torch.cat([torch.full((n, 1), BOS), torch.full((n, c.cells), IMG), ask_tok[:, None],
                         named_tok[:, None]], dim=1)
        return Prompts(ids, torch.ones_like(ids), feats, target, answer, ask_shape)

    segment_names = ("text", "image")

    def key_segments(self, input_ids: Tensor) -> Tensor:
        """(B, S) prompt + response ids -> (B, S) int64 segment ids: 1 at the N visual tokens (the
        prompt's ``<img>`` slots that ``TinyVLM.embed`` fills with cells), 0 elsewhere."""
        is_img = input_ids == IMG
        return (is_img & (is_img.cumsum(1) <= self.cfg.cells)).long()

    def target_positions(self, prompts: Prompts) -> Tensor:
        """(B,) sequence position of the target cell's visual token."""
        return 1 + prompts.target_cell

    def sft_targets(self, prompts: Prompts) -> Tensor:
        """(B, 3) the correct response ``<ans> answer <eos>``."""
        n = prompts.answer.shape[0]
        return torch.stack([torch.full((n,), ANS), prompts.answer, torch.full((n,), EOS)], dim=1)

    def reward(self, completions: Tensor, prompts: Prompts) -> Dict[str, Tensor]:
        """completions (B, T) new tokens -> {"reward", "accuracy", "format"} each (B,) float."""
        c = self.cfg
        t = completions.shape[1]
        first = completions[:, 0] if t > 0 else torch.full_like(prompts.answer, PAD)
        value = completions[:, 1] if t > 1 else torch.full_like(first, PAD)
        last = completions[:, 2] if t > 2 else torch.full_like(first, PAD)
        is_shape = (value >= self.shape_token(0)) & (value < self.shape_token(c.n_shapes))
        is_colour = (value >= self.colour_token(0)) & (value < self.colour_token(c.n_colours))
        right_kind = torch.where(prompts.ask_shape, is_shape, is_colour)
        fmt = ((first == ANS) & right_kind & (last == EOS)).float()
        acc = ((first == ANS) & (value == prompts.answer)).float()
        return {"reward": 0.9 * acc + 0.1 * fmt, "accuracy": acc, "format": fmt}
