"""Tile configs per head-dim class, the autotuner's pruning, and the environment knobs.

``settings()`` is the one place this package reads the environment:
  TRITON_INTERPRET      triton builds interpreted kernels (read through triton.knobs). It is fixed
                        when the kernels are decorated, i.e. when ral.backends.triton is first
                        imported: an interpreted process and a compiled one are separate processes.
  RAL_TRITON_AUTOTUNE   "0" or "": take the first config of the size class, no benchmarking.
  RAL_TRITON_Q_SPLITS   n: force the backward's query splits (tests, A/B timings).

GPU: autotuned over a few (BLOCK_M, BLOCK_N, warps, stages) per head-dim class (FORWARD_TABLE,
BACKWARD_TABLE). Interpreter: one small fixed config (INTERPRETER_BLOCKS), no autotuning; and
``interpreter_problem()`` names the one known pairing of versions under which it cannot run them.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from typing import Optional

from .common import IMPORT_ERROR, triton


@dataclass(frozen=True)
class Settings:
    interpret: bool          # TRITON_INTERPRET: kernels decorated now are interpreted
    autotune: bool           # RAL_TRITON_AUTOTUNE (default on)
    q_splits: Optional[int]  # RAL_TRITON_Q_SPLITS, None: chosen from the device (launch.q_splits)


def settings() -> Settings:
    """The environment knobs as they are now."""
    interpret = False
    if IMPORT_ERROR is None:
        try:
            interpret = bool(triton.knobs.runtime.interpret)
        except AttributeError:  # older triton: the environment variable
            interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    forced = os.environ.get("RAL_TRITON_Q_SPLITS", "")
    return Settings(interpret=interpret,
                    autotune=os.environ.get("RAL_TRITON_AUTOTUNE", "1") not in ("0", ""),
                    q_splits=int(forced) if forced else None)


def _major_minor(version: str) -> tuple[int, int]:
    """"3.6.0", "2.4.0rc1", "3.7.0+git1a2b" -> (3, 6), (2, 4), (3, 7)."""
    parts = re.findall(r"\d+", version)[:2]
    return (int(parts[0]), int(parts[1]) if len(parts) > 1 else 0) if parts else (0, 0)


@functools.lru_cache(maxsize=None)  # asked on every interpreted call; the versions do not change
def interpreter_problem(triton_version: Optional[str] = None, numpy_version: Optional[str] = None) -> Optional[str]:
    """Why TRITON_INTERPRET=1 cannot run these kernels with the installed triton and numpy, or None.

    Triton's interpreter before 3.7 hands a loop bound held in a runtime argument to Python as
    ``int(array of shape (1,))``, which numpy 2.4 and later refuse (TypeError: only 0-dimensional
    arrays can be converted to Python scalars); every kernel here loops to such a bound (key blocks,
    heads). Seen with triton 3.6.0 and numpy 2.4.6 / 2.5.5; triton 3.7 converts with ``squeeze()``.
    The compiled kernels are not affected. Defaults: the installed versions."""
    if IMPORT_ERROR is not None:
        return None
    if numpy_version is None:
        try:
            import numpy
        except ImportError:  # triton's interpreter says so itself
            return None
        numpy_version = numpy.__version__
    triton_version = triton.__version__ if triton_version is None else triton_version
    if _major_minor(triton_version) < (3, 7) and _major_minor(numpy_version) >= (2, 4):
        return (f"the Triton interpreter of triton {triton_version} cannot run these kernels with numpy "
                f"{numpy_version} (it turns loop bounds into Python ints with int() of a 1-element array, "
                "which numpy >= 2.4 refuses): install triton>=3.7 or numpy<2.4")
    return None


MAX_HEAD_DIM = 256  # D, Dv and Dr above this: unsupported_reason says so
INTERPRETER_BLOCKS = dict(BLOCK_M=16, BLOCK_N=16)

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per size class, first = the one RAL_TRITON_AUTOTUNE=0
# runs. Chosen by compiling every kernel variant for sm_80 and sm_90a with triton 3.9's ptxas
# (tests/test_triton_compile.py; RAL_TRITON_COMPILE_ALL=1 sweeps them all): every config fits the
# opt-in shared memory of both (163 / 227 KB). In 16-bit types at head dims <= 128 the first
# spills no registers, or a few dozen bytes in some variants (ptxas is not monotone in the tile
# size there); the others may spill a few hundred bytes and are left to the autotuner. Dropped:
# BLOCK_M = 64 with 4 warps, 128 x 64, and the backward's 32 x 32 .. 64 x 64 tiles with 4 warps
# at head dim >= 128, which spill 0.3-24 KB per thread; at head dim 256 the old first forward
# config (64 x 64, 4 warps) needed 172 KB / 262 KB of shared memory for heads="each" kl /
# reverse_kl, over both limits. Known: the backward at head dim 256 spills with every tile tried
# (16 x 16 .. 64 x 64, 4 or 8 warps; its dk/dv accumulators, BLOCK_N x 256 fp32 each, stay in
# registers): the first config 16-360 B, up to ~1 KB for "mean" with GQA; fp32 spills more at
# head dim >= 128 (fp32 is the accuracy path, not the fast one). Not timed on hardware yet.
FORWARD_TABLE = {
    64: [(32, 64, 8, 2), (64, 32, 8, 2), (64, 64, 8, 2)],
    128: [(32, 64, 8, 2), (16, 64, 4, 2), (64, 64, 8, 2)],
    256: [(32, 32, 8, 2), (16, 32, 4, 2), (32, 64, 8, 2)],
    512: [(16, 32, 4, 2), (32, 32, 8, 1)],
}
BACKWARD_TABLE = {
    64: [(16, 64, 8, 1), (16, 32, 8, 2), (32, 32, 8, 2)],
    128: [(16, 32, 8, 1), (16, 32, 8, 2), (16, 64, 8, 1)],
    256: [(16, 32, 8, 1), (16, 16, 4, 1)],
    512: [(16, 16, 4, 1), (16, 32, 8, 1)],
}

# The autotuner's cache keys (besides the dtypes of the tensor arguments, which triton adds).
FORWARD_KEY = ["n_heads", "ref_heads", "group", "ref_group", "head_dim", "v_dim", "ref_dim", "len_bucket",
               "DIVERGENCE", "HEADS_EACH", "ONE_SWEEP", "EXCLUDE_SELF", "CAUSAL", "HAS_V", "HAS_REF_STATS", "NO_REF",
               "HAS_SEQS", "POLICY_STATS", "NUM_SEG"]
BACKWARD_KEY = ["n_heads", "ref_heads", "group", "ref_group", "head_dim", "v_dim", "ref_dim", "len_bucket",
                "DIVERGENCE", "HEADS_EACH", "EXCLUDE_SELF", "CAUSAL", "HAS_V", "HAS_SEQS", "POLICY_STATS", "NUM_SEG"]


def head_dim_class(args: dict) -> int:
    """64, 128, 256 (the largest padded head dim, at least 64), doubled for fp32 operands (PREC
    "ieee"), whose staged tiles take twice the shared memory and registers: 512 is fp32 at 256."""
    dim = max(int(args.get("D_PAD", 16)), int(args.get("DV_PAD", 16)), int(args.get("DR_PAD", 16)))
    size = max(64, dim)
    return size * 2 if args.get("PREC") == "ieee" else size


def _shape(cfg) -> tuple:
    return (cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.num_warps, cfg.num_stages)


def pruner(table: dict):
    """The autotuner's early_config_prune for `table`."""
    def prune(configs, named_args, **kwargs):
        """The configs of this call's size class, in the table's order; RAL_TRITON_AUTOTUNE=0
        keeps only the first (no benchmarking: each config takes seconds to tens of seconds to
        compile)."""
        by_shape = {_shape(cfg): cfg for cfg in configs}
        kept = [by_shape[shape] for shape in table[head_dim_class({**named_args, **kwargs})]]
        return kept if settings().autotune else kept[:1]
    return prune


def autotuned(kernel, table: dict, key: list, reset_to_zero: Optional[list] = None):
    """`kernel` autotuned over every config of `table`, pruned to the call's size class."""
    shapes = list(dict.fromkeys(shape for shapes in table.values() for shape in shapes))
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
               for bm, bn, w, st in shapes]
    return triton.autotune(configs, key=key, reset_to_zero=reset_to_zero,
                           prune_configs_by={"early_config_prune": pruner(table)})(kernel)
