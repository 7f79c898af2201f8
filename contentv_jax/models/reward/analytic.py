"""An analytic reward for tests and demos: closeness of the frames' colour to a target.

``r = -mean_{h, w, c} (frames - target)^2 * scale`` per frame, with ``target`` an RGB colour in
``[0, 1]`` (default a saturated orange); its maximum 0 is reached by a uniform frame of that colour.
Optionally ``brightness`` (mean luma target, Rec. 601 weights) replaces the colour target:
``r = -(mean luma - brightness)^2 * scale``. Text is ignored (``context_length == 0``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from contentv_jax.models.reward.base import RewardModel, check_frames

LUMA = (0.299, 0.587, 0.114)


@dataclasses.dataclass(frozen=True)
class AnalyticConfig:
    """``target``: RGB in ``[0, 1]``; ``brightness``: a luma target in ``[0, 1]`` or ``None``; ``scale`` > 0.

    Raises (at construction):
      ValueError: a target outside ``[0, 1]``, a target of the wrong length, or ``scale <= 0``.
    """

    target: tuple[float, float, float] = (1.0, 0.5, 0.0)
    brightness: float | None = None
    scale: float = 1.0

    def __post_init__(self):
        if len(self.target) != 3 or not all(0.0 <= float(t) <= 1.0 for t in self.target):
            raise ValueError(f"analytic reward target: expected 3 values in [0, 1], got {self.target!r}")
        if self.brightness is not None and not 0.0 <= float(self.brightness) <= 1.0:
            raise ValueError(f"analytic reward brightness: expected a value in [0, 1] or None, got {self.brightness!r}")
        if not float(self.scale) > 0:
            raise ValueError(f"analytic reward scale: expected > 0, got {self.scale!r}")


class AnalyticReward(RewardModel):
    """``frames (B, H, W, 3)`` in ``[0, 1]`` -> ``(B,)`` float32, the negative mean squared colour error."""

    context_length = 0

    def __init__(self, cfg: AnalyticConfig = AnalyticConfig()):
        self.config = cfg

    def __call__(self, frames: jax.Array, input_ids=None) -> jax.Array:
        check_frames(frames)
        x = frames.astype(jnp.float32)
        c = self.config
        if c.brightness is not None:
            luma = jnp.tensordot(x, jnp.asarray(LUMA, jnp.float32), axes=([-1], [0])).mean(axis=(1, 2))
            return -c.scale * jnp.square(luma - c.brightness)
        return -c.scale * jnp.square(x - jnp.asarray(c.target, jnp.float32)).mean(axis=(1, 2, 3))
