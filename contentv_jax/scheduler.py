"""Flow-matching sigmas: the flow shift, the sampling schedule and training sigma draws.

Convention (diffusers, the one the checkpoints use; ContentV report (arXiv 2506.05343), section 5.1):
``x_sigma = (1 - sigma) * x0 + sigma * noise``, the model predicts ``v = noise - x0`` and receives
``timestep = sigma * 1000``. Mirrors ``diffusers/schedulers/scheduling_flow_match_euler_discrete.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

NUM_TRAIN_TIMESTEPS = 1000

# The flow shift ContentV samples with (technical report, section 4) when the model directory says nothing.
DEFAULT_SAMPLING_SHIFT = 17.0

# FlowMatchEulerDiscreteScheduler options that change the sampling schedule away from the static
# shift; the official ContentV pipeline never sets them, and we refuse them rather than ignore them.
_UNSUPPORTED_OPTIONS = (
    "use_dynamic_shifting",
    "shift_terminal",
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "invert_sigmas",
    "stochastic_sampling",
)


def shift_sigmas(sigmas, shift: float):
    """The flow shift ``s * sigma / (1 + (s - 1) * sigma)`` (diffusers' static shift).

    Works on NumPy and JAX arrays alike; ``shift == 1`` is the identity. Raises ValueError for shift <= 0.
    """
    if shift <= 0:
        raise ValueError(f"flow shift must be > 0, got {shift}")
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def sampling_sigmas(num_steps: int, shift: float) -> np.ndarray:
    """Sampling schedule: ``linspace(1, 0, N+1)[:-1]`` shifted, then a final 0 appended.

    Exactly what the official ContentV pipeline (``contentv_pipeline.py``) gets from diffusers'
    ``FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=np.linspace(1, 0, N + 1)[:-1])`` with a
    static ``shift``: the float64 linspace is cast to float32, shifted in float32, and a 0 appended.
    The transformer receives ``timestep = sigmas[i] * 1000`` (float32) at step ``i``, and the Euler
    step is ``x <- x + (sigmas[i + 1] - sigmas[i]) * velocity``.

    Returns:
      float32 array of shape (num_steps + 1,), decreasing from 1 to 0.
    Raises:
      ValueError: if ``num_steps < 1``.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    sigmas = np.linspace(1.0, 0.0, num_steps + 1)[:-1].astype(np.float32)
    sigmas = shift_sigmas(sigmas, shift).astype(np.float32)
    return np.concatenate([sigmas, np.zeros(1, np.float32)])


def sample_training_sigmas(
    key: jax.Array, batch: int, *, logit_mean: float = 0.0, logit_std: float = 1.0, shift: float = 1.0
) -> jax.Array:
    """Logit-normal sigmas with the flow shift (report section 5; SD3's ``logit_normal`` weighting).

    ``sigma = shift(sigmoid(n))`` with ``n ~ N(logit_mean, logit_std^2)``. Returns float32 (batch,) in (0, 1).
    """
    n = logit_mean + logit_std * jax.random.normal(key, (batch,), dtype=jnp.float32)
    return shift_sigmas(jax.nn.sigmoid(n), shift)


def scheduler_shift(scheduler_config: str | Path | None, default: float = DEFAULT_SAMPLING_SHIFT) -> float:
    """The flow shift of a diffusers ``scheduler/scheduler_config.json``, or ``default`` if there is none.

    Args:
      scheduler_config: path of a ``FlowMatchEulerDiscreteScheduler`` config (JSON), or None.
      default: returned when ``scheduler_config`` is None or the file does not exist.
    Raises:
      ValueError: if the config enables an option that changes the schedule beyond the static shift
        (dynamic shifting, shift_terminal, Karras/exponential/beta sigmas, inverted sigmas,
        stochastic sampling), since :func:`sampling_sigmas` would silently differ from diffusers.
    """
    if scheduler_config is None or not Path(scheduler_config).is_file():
        return float(default)
    with open(scheduler_config) as f:
        cfg = json.load(f)
    enabled = [k for k in _UNSUPPORTED_OPTIONS if cfg.get(k)]
    if enabled:
        raise ValueError(
            f"{scheduler_config}: scheduler options {enabled} are not supported by the ContentV sampler "
            "(only the static flow shift is); pass --shift to override"
        )
    return float(cfg.get("shift", 1.0))
