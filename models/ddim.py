"""Deterministic DDIM (eta = 0): sampling, its exact inversion, and the training target.

Every prediction type makes one DDIM step a linear map of the current latent and
the model output:

    x_s = A(t, s) * x_t + B(t, s) * out(x_t, t)        (s: the next, less noisy level)

so the step is inverted by solving for x_t, x_t = (x_s - B * out) / A, with the
model evaluated at (x_s, t) because x_t is not known yet (the usual DDIM inversion
approximation, as Tune-A-Video and diffusers' DDIMInverseScheduler). For epsilon
prediction this is the familiar inversion formula. For v-prediction it is not what
converting v with the current latent's noise level gives (diffusers'
DDIMInverseScheduler reads v as if it belonged to alpha_s, but the model produced it
for alpha_t); solving the sampling step's own linear relation makes inversion the
exact mirror of sampling, so a round trip only carries the out(x_s, t) ~ out(x_t, t)
error.

Timesteps come from the diffusers scheduler's own `set_timesteps` (spacing, offset);
each sampling step goes to the next timestep of that grid, the last one to the
final level (alpha = 1 with set_alpha_to_one, else alphas_cumprod[0]), as
diffusers' DDIMScheduler does for "leading" and "trailing" spacing. Sample clipping
and thresholding are not applied: they would make the step non-invertible (the SD 2
configs have them off).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _coefficients(a_t: float, a_s: float, prediction_type: str) -> tuple[float, float]:
    """(A, B) of x_s = A * x_t + B * out, computed in float64."""
    st, ss = math.sqrt(a_t), math.sqrt(a_s)
    nt, ns = math.sqrt(1.0 - a_t), math.sqrt(1.0 - a_s)
    if prediction_type == "epsilon":
        return ss / st, ns - ss * nt / st
    if prediction_type == "v_prediction":
        # x0 = st x - nt v, eps = st v + nt x  ->  x_s = ss x0 + ns eps
        return ss * st + ns * nt, ns * st - ss * nt
    if prediction_type == "sample":
        a = ns / nt
        return a, ss - a * st
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def scheduler_config(scheduler: Any) -> dict[str, Any]:
    """A diffusers scheduler (or its config) as a plain dict without private keys."""
    cfg = getattr(scheduler, "config", scheduler)
    return {k: v for k, v in dict(cfg).items() if not str(k).startswith("_")}


class DDIM:
    """DDIM with `steps` steps over a diffusers scheduler config (any class: only its betas and spacing are used)."""

    def __init__(self, scheduler: Any, steps: int, prediction_type: str | None = None):
        from diffusers import DDIMScheduler

        config = scheduler_config(scheduler)
        sched = DDIMScheduler.from_config(config)
        sched.set_timesteps(int(steps))
        self.config = config
        self.steps = int(steps)
        self.prediction_type = prediction_type or sched.config.prediction_type
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}")
        self.timesteps = sched.timesteps.clone().long()  # descending: the sampling order
        alphas = sched.alphas_cumprod.double()
        self.alphas_cumprod = alphas
        self.final_alpha = 1.0 if sched.config.set_alpha_to_one else float(alphas[0])
        self._coef = []
        for i, t in enumerate(self.timesteps.tolist()):
            a_s = float(alphas[self.timesteps[i + 1]]) if i + 1 < len(self.timesteps) else self.final_alpha
            self._coef.append(_coefficients(float(alphas[t]), a_s, self.prediction_type))

    # -- single steps -------------------------------------------------------------------

    def step(self, out: torch.Tensor, i: int, x: torch.Tensor) -> torch.Tensor:
        """Sampling step i: x at level timesteps[i] -> the next level."""
        a, b = self._coef[i]
        return a * x + b * out

    def inverse_step(self, out: torch.Tensor, i: int, x: torch.Tensor) -> torch.Tensor:
        """Inverse of sampling step i: x at the next level -> level timesteps[i] (out = model(x, timesteps[i]))."""
        a, b = self._coef[i]
        return (x - b * out) / a

    # -- loops --------------------------------------------------------------------------

    @torch.no_grad()
    def invert(
        self, model: ModelFn, z0: torch.Tensor, trajectory: bool = False, fixed_point_iters: int = 0
    ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """z0 -> z_T. With `trajectory`, also [z0, x at timesteps[-1], ..., x at timesteps[0] = z_T]
        (index k holds the level that sampling step steps-1-k ends at).

        fixed_point_iters > 0 re-evaluates the model at the current estimate of x_t and
        solves the step again, that many times: x_t = (x_s - B out(x_t, t)) / A is the
        exact inverse of the sampling step, so each iteration (one more model call per
        step) brings the round trip closer to exact. 0 is plain DDIM inversion.
        """
        x = z0
        traj = [z0.detach().clone()] if trajectory else None
        for i in reversed(range(self.steps)):
            t = self.timesteps[i]
            x_t = self.inverse_step(model(x, t), i, x)
            for _ in range(int(fixed_point_iters)):
                x_t = self.inverse_step(model(x_t, t), i, x)
            x = x_t
            if traj is not None:
                traj.append(x.detach().clone())
        return x, traj

    @torch.no_grad()
    def sample(
        self,
        model: ModelFn,
        z_T: torch.Tensor,
        after_step: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """z_T -> z0. `after_step(i, x)` may replace the latent after step i (e.g. foreground blending)."""
        x = z_T
        for i in range(self.steps):
            x = self.step(model(x, self.timesteps[i]), i, x)
            if after_step is not None:
                x = after_step(i, x)
        return x

    def trajectory_index(self, i: int) -> int:
        """Index in `invert`'s trajectory of the level sampling step i ends at."""
        return self.steps - 1 - i


# -- training ---------------------------------------------------------------------------


def noisy_and_target(
    alphas_cumprod: torch.Tensor, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward-process sample x_t and the model's regression target for it.

    z0, noise (B, ...); t (B,) integer timesteps. v = sqrt(a) eps - sqrt(1 - a) z0.
    """
    a = alphas_cumprod.to(z0.device, torch.float64)[t].to(z0.dtype).view(-1, *([1] * (z0.dim() - 1)))
    sa, sn = a.sqrt(), (1 - a).sqrt()
    x_t = sa * z0 + sn * noise
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = sa * noise - sn * z0
    elif prediction_type == "sample":
        target = z0
    else:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    return x_t, target


def tiny_scheduler_config(prediction_type: str = "v_prediction") -> dict[str, Any]:
    """SD 2.1's DDIM settings (scaled-linear betas, 'leading' spacing, offset 1) for the tiny preset."""
    return {
        "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1, "prediction_type": prediction_type,
        "timestep_spacing": "leading", "thresholding": False,
    }


def config_for_key(config: Mapping[str, Any]) -> dict[str, Any]:
    """The scheduler settings that change DDIM's numbers (for cache keys)."""
    keep = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "set_alpha_to_one",
            "steps_offset", "prediction_type", "timestep_spacing", "rescale_betas_zero_snr")
    out = {k: config.get(k) for k in keep}
    if out.get("trained_betas") is not None:
        out["trained_betas"] = [float(b) for b in out["trained_betas"]]
    return out
