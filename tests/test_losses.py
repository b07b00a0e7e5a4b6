"""logits_matching_loss and equal_mean_init_ (docs/papers.md section 1)."""
import math

import pytest
import torch

import kdengine


def test_logits_matching_is_half_mse(seed):
    s, t = torch.randn(4, 9, dtype=torch.float64), torch.randn(4, 9, dtype=torch.float64)
    mse = torch.nn.functional.mse_loss(s, t)
    torch.testing.assert_close(kdengine.logits_matching_loss(s, t), mse / 2)
    torch.testing.assert_close(kdengine.logits_matching_loss(s, t, reduction="mean"), mse / 18)
    rows = kdengine.logits_matching_loss(s, t, reduction="none")
    torch.testing.assert_close(rows, ((s - t) ** 2).sum(-1) / 18)
    torch.testing.assert_close(kdengine.logits_matching_loss(s, t, reduction="sum"), rows.sum())


def test_centered_matching_ignores_a_constant_shift(seed):
    s, t = torch.randn(3, 7, dtype=torch.float64), torch.randn(3, 7, dtype=torch.float64)
    a = kdengine.logits_matching_loss(s, t, centered=True)
    b = kdengine.logits_matching_loss(s + 5.0, t, centered=True)
    torch.testing.assert_close(a, b)
    assert kdengine.logits_matching_loss(s + 5.0, t) > a
    # Centered matching is the exact T -> inf limit of T^2 KL.
    torch.testing.assert_close(a, kdengine.kd_loss(s, t, math.inf, backend="reference"))


def test_logits_matching_bad_input():
    with pytest.raises(ValueError, match="same shape"):
        kdengine.logits_matching_loss(torch.randn(2, 3), torch.randn(2, 4))
    with pytest.raises(ValueError, match="reduction"):
        kdengine.logits_matching_loss(torch.randn(2, 3), torch.randn(2, 3), reduction="x")
    with pytest.raises(TypeError, match="student_logits"):
        kdengine.logits_matching_loss(torch.ones(2, 3, dtype=torch.long), torch.randn(2, 3))


def test_equal_mean_init_makes_the_logit_mean_constant(seed):
    layer = torch.nn.Linear(6, 10)
    kdengine.equal_mean_init_(layer, target_mean=0.25)
    z = layer(torch.randn(32, 6))
    torch.testing.assert_close(z.mean(-1), torch.full((32,), 0.25), atol=1e-6, rtol=0)


def test_class_mean_is_conserved_under_kd_and_ce(seed):
    """The logit gradient sums to zero over classes, so SGD never moves the mean row / bias."""
    layer = torch.nn.Linear(5, 8)
    kdengine.equal_mean_init_(layer)
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    x, teacher = torch.randn(16, 5), torch.randn(16, 8) * 3
    y = torch.randint(0, 8, (16,))
    for _ in range(20):
        opt.zero_grad()
        kdengine.kd_loss(layer(x), teacher, 4.0, labels=y, hard_weight=0.5).backward()
        opt.step()
    assert layer.weight.mean(0).abs().max() < 1e-5
    assert abs(float(layer.bias.mean())) < 1e-5
    assert layer.weight.abs().sum() > 0  # it did learn


def test_equal_mean_init_bad_input():
    with pytest.raises(TypeError, match="nn.Linear"):
        kdengine.equal_mean_init_(torch.nn.Conv2d(1, 1, 1))
    with pytest.raises(ValueError, match="bias"):
        kdengine.equal_mean_init_(torch.nn.Linear(2, 3, bias=False), target_mean=1.0)
