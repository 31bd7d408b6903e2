"""The builder's own pieces: budgetnas's Dropout is dropout, however its CPU masks are drawn."""

import pytest
import torch
from torch import nn

from models.build import Dropout, build
from models.presets import PRESETS


@pytest.mark.parametrize("p", [0.05, 0.3])
def test_dropout_drops_p_and_keeps_the_mean(p):
    torch.manual_seed(0)
    x = torch.ones(64, 32, 24, 24).contiguous(memory_format=torch.channels_last)
    y = Dropout(p).train()(x)
    n = x.numel()
    dropped = (y == 0).sum().item() / n
    assert abs(dropped - p) < 5 * (p * (1 - p) / n) ** 0.5  # five binomial standard deviations
    assert torch.allclose(y[y != 0], torch.full((), 1 / (1 - p)))
    assert y.is_contiguous(memory_format=torch.channels_last)


def test_dropout_masks_are_independent_across_calls_and_seeded():
    x = torch.ones(8, 16, 12, 12)
    torch.manual_seed(1)
    a, b = Dropout(0.2)(x), Dropout(0.2)(x)
    torch.manual_seed(1)
    assert torch.equal(Dropout(0.2)(x), a)
    assert not torch.equal(a, b)


def test_dropout_gradient_is_the_mask_and_eval_is_identity():
    x = torch.randn(4, 8, 10, 10, requires_grad=True)
    layer = Dropout(0.25)
    y = layer(x)
    y.sum().backward()
    assert torch.equal(x.grad, (y != 0).float() / 0.75)
    layer.eval()
    assert torch.equal(layer(x), x)
    assert repr(layer) == repr(nn.Dropout(0.25))


def test_built_model_has_no_extra_state():
    model = build(PRESETS["baseline"])
    assert any(isinstance(m, Dropout) for m in model)
    assert sum(p.numel() for p in model.parameters()) == 19_674
    assert not any("dropout" in k.lower() for k in model.state_dict())
