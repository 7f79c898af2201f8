"""Reward models for reward-gradient fine-tuning (RLHF), in Flax NNX, scores in float32.

The interface (``base.py``): a :class:`RewardModel` is an ``nnx.Module`` called as
``model(frames, input_ids) -> (B,)`` float32, differentiable in ``frames``:

- ``frames``: ``(B, H, W, 3)`` float in ``[0, 1]``, channels-last (decoded RGB frames);
- ``input_ids``: ``(B, L)`` or ``(1, L)`` int prompt token ids, ``L = model.context_length``
  (``None`` for rewards that ignore text, ``context_length == 0``).

:class:`Reward` pairs a model with its tokenizer (``reward(frames, ["a prompt", ...])``); tokenize on the
host once (``reward.tokenize``) and pass ids inside ``jit``.

Models (registry :data:`NAMES`):

- ``clip`` / ``pickscore``: :class:`CLIPModel` (HF ``CLIPModel``; PickScore_v1 is ViT-H/14),
  ``logit_scale.exp() * cos(image, text)``;
- ``mps``: :class:`MPSModel` (Kwai-Kolors/MPS: CLIP-H tokens + 4-layer cross-attention head);
- ``hps``: :class:`HPSModel` (HPSv2 / v2.1, open_clip ViT-H-14), ``cos(image, text)``;
- ``analytic``: :class:`AnalyticReward` (a colour / brightness target, for tests and demos).

Build a random model with :func:`build_reward`; load a checkpoint with
``contentv_jax.rewards_io.load_reward(name, path)`` (kept outside ``contentv_jax.models`` so that
models do not import the converters).
"""

from __future__ import annotations

from flax import nnx

from contentv_jax.models.reward.analytic import AnalyticConfig, AnalyticReward
from contentv_jax.models.reward.base import Reward, RewardModel, tokenize_with
from contentv_jax.models.reward.clip import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig
from contentv_jax.models.reward.hps import VIT_H_14_OPEN_CLIP, HPSModel, hps_config
from contentv_jax.models.reward.mps import CONDITION_OVERALL, MPSConfig, MPSModel, condition_ids
from contentv_jax.models.reward.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, clip_preprocess

NAMES = ("clip", "pickscore", "mps", "hps", "analytic")


def canonical_name(name: str) -> str:
    """``pickscore`` -> ``clip``; other names unchanged.

    Raises:
      ValueError: ``name`` is not one of :data:`NAMES`.
    """
    if name not in NAMES:
        raise ValueError(f"reward name: expected one of {NAMES}, got {name!r}")
    return "clip" if name == "pickscore" else name


def config_from_dict(name: str, d: dict):
    """The config dataclass of reward ``name`` from its ``to_dict()`` (or an HF ``CLIPConfig`` dict for clip/hps)."""
    name = canonical_name(name)
    if name == "analytic":
        return AnalyticConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()})
    if name == "mps":
        return MPSConfig.from_dict(d)
    return CLIPConfig.from_dict(d)


def build_reward(name: str, config=None, *, seed: int = 0) -> RewardModel:
    """A reward model with random parameters (or none, for ``analytic``).

    Args:
      name: one of :data:`NAMES`.
      config: the model's config dataclass (:class:`CLIPConfig`, :class:`MPSConfig`,
        :class:`AnalyticConfig`) or a dict for :func:`config_from_dict`; ``None``: the full-size default
        (ViT-H/14; for ``hps`` the open_clip ``ViT-H-14`` config).
      seed: parameter initialisation seed.
    Raises:
      ValueError: unknown ``name``.
    """
    name = canonical_name(name)
    if isinstance(config, dict):
        config = config_from_dict(name, config)
    if name == "analytic":
        return AnalyticReward(config or AnalyticConfig())
    rngs = nnx.Rngs(seed)
    with nnx.use_eager_sharding(False):
        if name == "mps":
            return MPSModel(config or MPSConfig(), rngs=rngs)
        if name == "hps":
            return HPSModel(config or hps_config(), rngs=rngs)
        return CLIPModel(config or CLIPConfig(), rngs=rngs)


__all__ = [
    "NAMES", "AnalyticConfig", "AnalyticReward", "CLIPConfig", "CLIPModel", "CLIPTextConfig", "CLIPVisionConfig",
    "CONDITION_OVERALL", "HPSModel", "MPSConfig", "MPSModel", "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "Reward",
    "RewardModel", "VIT_H_14_OPEN_CLIP", "build_reward", "canonical_name", "clip_preprocess", "condition_ids",
    "config_from_dict", "hps_config", "tokenize_with",
]
