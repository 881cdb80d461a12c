"""ral.checks: the shared argument checks, and the entry points that now use them where their own
checks let a bad value through or crashed without naming the argument."""

import math

import numpy as np
import pytest
import torch

from ral.checks import check_choice, check_flag, check_float, check_int
from ral.integrations.distill import DistillConfig
from ral.losses import group_advantages, masked_token_mean, reduce_tokens


@pytest.mark.parametrize("value,least,ok", [(3, 3, True), (np.int64(4), 1, True), (2, 3, False), (True, 0, False),
                                            (2.0, 0, False), ("2", 0, False), (None, 0, False)])
def test_check_int(value, least, ok):
    if ok:
        check_int("n", value, least)
    else:
        with pytest.raises(ValueError, match=rf"n must be an int >= {least}, got"):
            check_int("n", value, least)


@pytest.mark.parametrize("value,bound,ok", [(0, ">= 0", True), (0.0, "> 0", False), (1e-9, "> 0", True),
                                            (-2.5, "", True), (math.inf, "", False), (math.nan, ">= 0", False),
                                            (False, "", False), ("1.0", "", False), (np.float32(0.5), "> 0", True),
                                            (torch.tensor(1.0), "", False)])
def test_check_float(value, bound, ok):
    if ok:
        check_float("x", value, bound)
    else:
        with pytest.raises(ValueError, match=rf"x must be a finite float {bound}".rstrip()):
            check_float("x", value, bound)


def test_check_choice_and_flag():
    check_choice("mode", "a", ("a", "b"))
    with pytest.raises(ValueError, match=r"mode must be one of \('a', 'b'\), got 'c'"):
        check_choice("mode", "c", ("a", "b"))
    with pytest.raises(TypeError, match="mode must be a str, one of"):
        check_choice("mode", None, ("a", "b"))
    check_flag("on", False)
    with pytest.raises(TypeError, match="on must be a bool, got int"):
        check_flag("on", 1)


@pytest.mark.parametrize("field,value,error,message", [
    ("temperature", "1", ValueError, "temperature must be a finite float > 0"),   # was: '>' between str and int
    ("temperature", math.inf, ValueError, "temperature must be a finite float > 0"),   # was accepted
    ("chunk_size", True, ValueError, "chunk_size must be an int >= 1"),              # was accepted (chunks of 1)
    ("mu", True, ValueError, "mu must be a finite float >= 0"),                        # was accepted
    ("norm", None, TypeError, "norm must be a str")])
def test_distill_config_refuses(field, value, error, message):
    with pytest.raises(error, match=message):
        DistillConfig(**{field: value})


def test_losses_name_their_arguments():
    x, m = torch.ones(2, 3), torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(TypeError, match="loss_type must be a str"):
        reduce_tokens(x, m, None)
    with pytest.raises(TypeError, match="norm must be a str"):
        masked_token_mean(x, m, 0)
    rewards = torch.tensor([1.0, 0.0, 2.0, 2.0])
    assert torch.equal(group_advantages(rewards, np.int64(2), scale=False), torch.tensor([0.5, -0.5, 0.0, 0.0]))
