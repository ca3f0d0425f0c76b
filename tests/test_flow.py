import math

import pytest
import torch
from torch import nn

from llsa.flow import FlowMatching


class Recorder(nn.Module):
    """A fake model: returns ``fn(x, sigma, y)`` and records every call."""

    def __init__(self, fn):
        super().__init__()
        self.fn, self.calls = fn, []

    def forward(self, x, t, y=None):
        self.calls.append((x.clone(), t.clone(), None if y is None else y.clone()))
        return self.fn(x, (t / 1000).view(-1, 1, 1, 1), y)


@pytest.mark.parametrize("size, s", [(16, 1.0), (64, 1.0), (128, 2.0), (256, 4.0), ((128, 32), 1.0),
                                     ((256, 128), 2 * math.sqrt(2))])
def test_default_noise_rescale(size, s):
    assert FlowMatching(size).noise_rescale == pytest.approx(s)


def test_explicit_noise_rescale_and_bad_options():
    assert FlowMatching(256, noise_rescale=1.5).noise_rescale == 1.5
    with pytest.raises(ValueError, match="timestep_sampling"):
        FlowMatching(32, timestep_sampling="cosine")
    with pytest.raises(ValueError, match="shift"):
        FlowMatching(32, shift=0.0)


def test_uniform_sigmas_are_the_training_levels():
    fm = FlowMatching(32)
    sigma = fm.sample_sigmas(20000, torch.Generator().manual_seed(0))
    levels = sigma * 1000
    assert torch.allclose(levels, levels.round(), atol=1e-3)
    assert levels.min() >= 1 and levels.max() <= 1000
    assert abs(sigma.mean().item() - 0.5005) < 0.01
    again = fm.sample_sigmas(20000, torch.Generator().manual_seed(0))
    assert torch.equal(sigma, again)


def test_shift_and_logit_normal():
    plain = FlowMatching(32).sample_sigmas(1000, torch.Generator().manual_seed(1))
    shifted = FlowMatching(32, shift=3.0).sample_sigmas(1000, torch.Generator().manual_seed(1))
    assert torch.allclose(shifted, 3 * plain / (1 + 2 * plain))
    fm = FlowMatching(32, timestep_sampling="logit_normal", logit_normal_mean=1.0, logit_normal_std=0.5)
    sigma = fm.sample_sigmas(20000, torch.Generator().manual_seed(2))
    logit = torch.log(sigma / (1 - sigma))
    assert abs(logit.mean().item() - 1.0) < 0.02 and abs(logit.std().item() - 0.5) < 0.02


def test_loss_by_hand():
    fm = FlowMatching(128)  # s = 2
    x0 = torch.rand(3, 2, 4, 4) * 2 - 1
    out = torch.randn(3, 2, 4, 4)
    model = Recorder(lambda x, sigma, y: out)
    loss = fm.loss(model, x0, torch.Generator().manual_seed(0))
    (x_t, t, _), = model.calls
    sigma = (t / 1000).view(-1, 1, 1, 1)
    # Recover the noise from x_t = (1 - sigma) x0 + sigma * s * eps.
    eps = (x_t - (1 - sigma) * x0) / (2 * sigma)
    assert abs(eps.std().item() - 1) < 0.3
    target = 2 * eps - x0
    assert loss.item() == pytest.approx(((out - target) ** 2).mean().item(), rel=1e-4)


def test_loss_vanishes_for_the_true_velocity():
    fm = FlowMatching(128)
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    # For one data point the path is straight, so v = (x_t - x0) / sigma = s * eps - x0.
    model = Recorder(lambda x, sigma, y: (x - x0) / sigma)
    assert fm.loss(model, x0, torch.Generator().manual_seed(0)).item() < 1e-6
    zero = Recorder(lambda x, sigma, y: torch.zeros_like(x))
    assert fm.loss(zero, x0, torch.Generator().manual_seed(0)).item() > 1.0


@pytest.mark.parametrize("sampler, calls", [("euler", 20), ("heun", 39)])
def test_constant_velocity_is_integrated_exactly(sampler, calls):
    fm = FlowMatching(128)
    noise = torch.randn(2, 3, 4, 4) * 0.1
    c = torch.rand(1, 3, 1, 1) - 0.5
    model = Recorder(lambda x, sigma, y: c.expand_as(x))
    images = fm.sample(model, noise, steps=20, sampler=sampler)
    assert len(model.calls) == calls
    # From s * noise at sigma = 1 to sigma = 0: x = s * noise - c.
    assert torch.allclose(images, (2 * noise - c) / 2 + 0.5, atol=1e-6)


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_straight_paths_land_on_the_data(sampler):
    fm = FlowMatching(16)
    x0 = torch.rand(2, 3, 4, 4) * 1.6 - 0.8
    model = Recorder(lambda x, sigma, y: (x - x0) / sigma)
    images = fm.sample(model, torch.randn(2, 3, 4, 4), steps=7, sampler=sampler)
    assert torch.allclose(images, x0 / 2 + 0.5, atol=1e-5)


def test_time_grid():
    model = Recorder(lambda x, sigma, y: torch.zeros_like(x))
    FlowMatching(32).sample(model, torch.randn(1, 1, 2, 2), steps=5)
    seen = torch.stack([t for _, t, _ in model.calls])[:, 0]
    assert torch.allclose(seen, torch.linspace(1000, 1, 5))


def test_classifier_free_guidance():
    fm = FlowMatching(16)
    noise = torch.randn(2, 1, 2, 2) * 0.1
    y = torch.tensor([1, 2])
    # Velocity = 0.1 * label: conditional 0.1 * y, unconditional (null class 5) 0.5.
    model = Recorder(lambda x, sigma, y: 0.1 * y.float().view(-1, 1, 1, 1).expand_as(x))
    images = fm.sample(model, noise, steps=4, y=y, cfg_scale=3.0, null_class=5)
    v = 0.5 + 3.0 * (0.1 * y.float().view(-1, 1, 1, 1) - 0.5)
    assert torch.allclose(images, ((noise - v) / 2 + 0.5).clamp(0, 1), atol=1e-6)
    assert model.calls[0][2].tolist() == [1, 2, 5, 5]
    with pytest.raises(ValueError, match="sampler"):
        fm.sample(model, noise, sampler="rk4")
