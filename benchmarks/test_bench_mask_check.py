"""bench_mask_check.py runs on a small shape (its own assertion: a causal padded mask has no
non-causal row) and prints its line."""

import os
import sys

import pytest

pytest.importorskip("transformers")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_mask_check  # noqa: E402


def test_small_shape(capsys):
    bench_mask_check.main(["--shapes", "2x64,1x33"])
    out = capsys.readouterr().out
    assert "B=2 S=64: mask 0 Mi bools" in out and "B=1 S=33" in out
