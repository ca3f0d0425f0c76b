"""Rectified-flow training target and ODE samplers, with the noise rescaling of the LLSA paper.

The path from data ``x0`` (in [-1, 1]) to noise is ``x_t = (1 - sigma) x0 + sigma * s * eps`` and the
model predicts its velocity ``v = s * eps - x0`` from ``(x_t, 1000 * sigma)``. The noise scale ``s``
keeps the signal-to-noise ratio of a large image equal to that of a 64 x 64 one: averaging over
``(n/64)^2`` times more pixels makes the same noise look ``n/64`` times weaker, so it is scaled up by
that much.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

TIMESTEP_SAMPLINGS = ("uniform", "logit_normal")
SAMPLERS = ("euler", "heun")


@dataclass
class FlowMatching:
    """Flow matching for ``image_size`` images (an int, or ``(H, W)``).

    ``noise_rescale=None`` takes ``s = n / 64`` for images of ``n x n`` pixels with ``n > 64`` and 1
    otherwise; for ``H x W`` images ``n = sqrt(H * W)``, since the SNR argument counts pixels.
    ``timestep_sampling``: ``"uniform"`` over the ``num_train_timesteps`` levels
    ``sigma_i = (T - i) / T`` (the paper's choice) or ``"logit_normal"`` (``sigma = sigmoid(m + s * z)``).
    ``shift`` applies the SD3 shift ``a * sigma / (1 + (a - 1) * sigma)`` to the drawn sigmas.
    """

    image_size: int | tuple[int, int]
    noise_rescale: float | None = None
    timestep_sampling: str = "uniform"
    shift: float = 1.0
    logit_normal_mean: float = 0.0
    logit_normal_std: float = 1.0
    num_train_timesteps: int = 1000

    def __post_init__(self):
        size = self.image_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        if h < 1 or w < 1:
            raise ValueError(f"FlowMatching: `image_size` must be positive, got {self.image_size}")
        if self.noise_rescale is None:
            n = math.sqrt(h * w)
            self.noise_rescale = n / 64 if n > 64 else 1.0
        if self.noise_rescale <= 0:
            raise ValueError(f"FlowMatching: `noise_rescale` must be > 0 (or None for n/64), got {self.noise_rescale}")
        if self.timestep_sampling not in TIMESTEP_SAMPLINGS:
            raise ValueError(f"FlowMatching: `timestep_sampling` must be one of {TIMESTEP_SAMPLINGS}, "
                             f"got {self.timestep_sampling!r}")
        if self.shift <= 0:
            raise ValueError(f"FlowMatching: `shift` must be > 0 (1 = no shift), got {self.shift}")
        if self.logit_normal_std <= 0:
            raise ValueError(f"FlowMatching: `logit_normal_std` must be > 0, got {self.logit_normal_std}")
        if self.num_train_timesteps < 1:
            raise ValueError(f"FlowMatching: `num_train_timesteps` must be >= 1, got {self.num_train_timesteps}")

    def sample_sigmas(self, batch: int, generator: torch.Generator, device=None) -> torch.Tensor:
        """``batch`` noise levels in (0, 1], float32 on ``device``, drawn with ``generator``."""
        gen_device = generator.device
        if self.timestep_sampling == "uniform":
            n = self.num_train_timesteps
            i = torch.randint(0, n, (batch,), generator=generator, device=gen_device)
            sigma = (n - i).float() / n
        else:
            z = torch.randn(batch, generator=generator, device=gen_device)
            sigma = torch.sigmoid(self.logit_normal_mean + self.logit_normal_std * z)
        a = self.shift
        sigma = a * sigma / (1 + (a - 1) * sigma)
        return sigma.to(device if device is not None else gen_device)

    def loss(self, model, x0: torch.Tensor, generator: torch.Generator, y: torch.Tensor | None = None) -> torch.Tensor:
        """Mean squared error (fp32) between ``model(x_t, 1000 * sigma, y)`` and ``s * eps - x0``.

        When the model has ``drop_labels`` (class-conditional DiT), labels are dropped to the null
        class with the model's ``class_dropout`` rate, drawn from ``generator``, for guidance.
        """
        s = self.noise_rescale
        sigma = self.sample_sigmas(x0.shape[0], generator, x0.device)
        eps = torch.randn(x0.shape, generator=generator, device=generator.device).to(x0)
        if y is not None and hasattr(model, "drop_labels"):
            y = model.drop_labels(y, generator)
        sig = sigma.view(-1, *[1] * (x0.dim() - 1)).to(x0.dtype)
        x_t = (1 - sig) * x0 + sig * (s * eps)
        target = s * eps - x0
        pred = model(x_t, 1000 * sigma, y)
        return F.mse_loss(pred.float(), target.float())

    @torch.no_grad()
    def sample(self, model, noise: torch.Tensor, steps: int = 20, sampler: str = "euler",
               y: torch.Tensor | None = None, cfg_scale: float = 1.0, null_class: int | None = None) -> torch.Tensor:
        """Integrate the flow ODE from ``s * noise`` at sigma = 1 to sigma = 0; images in [0, 1].

        ``noise`` is a standard normal tensor the caller drew. Time grid: ``linspace(1000, 1, steps) /
        1000`` plus a final 0. With labels ``y`` and ``cfg_scale != 1``, classifier-free guidance
        ``v_u + cfg_scale * (v_c - v_u)`` uses ``null_class`` (default ``model.config.num_classes``).
        """
        if sampler not in SAMPLERS:
            raise ValueError(f"FlowMatching.sample: `sampler` must be one of {SAMPLERS}, got {sampler!r}")
        if steps < 1:
            raise ValueError(f"FlowMatching.sample: `steps` must be >= 1, got {steps}")
        guided = y is not None and cfg_scale != 1.0
        if guided and null_class is None:
            null_class = model.config.num_classes

        def velocity(x, sigma):
            t = torch.full((x.shape[0],), 1000 * sigma, device=x.device, dtype=torch.float32)
            if not guided:
                return model(x, t, y)
            null = torch.full_like(y, null_class)
            v_c, v_u = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])).chunk(2)
            return v_u + cfg_scale * (v_c - v_u)

        sigmas = torch.linspace(1000, 1, steps, dtype=torch.float64) / 1000
        sigmas = torch.cat([sigmas, sigmas.new_zeros(1)]).tolist()
        x = self.noise_rescale * noise
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
            dt = sigma_next - sigma
            v = velocity(x, sigma)
            x_next = x + dt * v
            # Heun's correction needs the velocity at sigma_next; the last step to sigma = 0 stays Euler.
            if sampler == "heun" and sigma_next > 0:
                x_next = x + dt * (v + velocity(x_next, sigma_next)) / 2
            x = x_next
        return (x / 2 + 0.5).clamp(0, 1)
