"""The reward interface every reward model implements, and the tokenizer-carrying wrapper.

A reward model is an ``nnx.Module`` (so it splits, shards and jits like the generator) called as
``model(frames, input_ids) -> (B,)`` float32, differentiable with respect to ``frames``:

- ``frames``: ``(B, H, W, 3)`` float in ``[0, 1]``, channels-last (decoded RGB frames; any ``H, W`` at
  least the model's input size after the short-side resize);
- ``input_ids``: ``(B, L)`` or ``(1, L)`` int token ids of the prompts (``(1, L)`` scores every frame
  against one prompt), ``L = model.context_length``; models that ignore text (``context_length == 0``)
  accept ``None``.

Tokenization runs on the host, outside ``jit``: :class:`Reward` pairs a model with its tokenizer and
accepts strings or ids.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class RewardModel(nnx.Module):
    """Base class: ``__call__(frames (B, H, W, 3) in [0, 1], input_ids (B|1, L) int) -> (B,) float32``.

    Subclasses set ``context_length`` (token ids per prompt, 0 if the reward ignores text).
    """

    context_length: int = 0

    def __call__(self, frames: jax.Array, input_ids: jax.Array | None = None) -> jax.Array:
        raise NotImplementedError


def check_frames(frames: jax.Array) -> None:
    """Raise ``ValueError`` unless ``frames`` is ``(B, H, W, 3)``."""
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames: expected (B, H, W, 3) channels-last in [0, 1], got shape {tuple(frames.shape)}")


def broadcast_ids(input_ids, batch: int, length: int) -> jax.Array:
    """``input_ids (B|1, L)`` -> ``(B, L)`` int32.

    Raises:
      ValueError: ``input_ids`` is missing, not 2-D, has length other than ``length``, or a batch that
        is neither 1 nor ``batch``.
    """
    if input_ids is None:
        raise ValueError(f"input_ids: this reward needs prompt token ids of shape (B, {length}), got None")
    ids = jnp.asarray(input_ids)
    if ids.ndim != 2 or ids.shape[1] != length or ids.shape[0] not in (1, batch):
        raise ValueError(f"input_ids: expected shape ({batch}, {length}) or (1, {length}), got {tuple(ids.shape)}")
    return jnp.broadcast_to(ids.astype(jnp.int32), (batch, length))


def tokenize_with(tokenizer: Any, prompts: Sequence[str], length: int) -> np.ndarray:
    """Token ids ``(len(prompts), length)`` int32 from a ``transformers`` CLIP tokenizer: padded to
    ``length`` (``padding="max_length"``) and truncated, as PickScore, MPS and HPSv2 tokenize.

    Raises:
      ValueError: ``prompts`` is empty or not a sequence of strings.
    """
    if isinstance(prompts, str) or not len(prompts) or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts: expected a non-empty list of strings, got {prompts!r}")
    out = tokenizer(list(prompts), padding="max_length", max_length=length, truncation=True, return_tensors="np")
    return np.asarray(out["input_ids"], np.int32)


@dataclasses.dataclass
class Reward:
    """A reward model with its tokenizer: ``reward(frames, prompts) -> (B,)`` float32.

    Attributes:
      name: the registry name (``clip``, ``pickscore``, ``mps``, ``hps``, ``analytic``).
      model: the :class:`RewardModel` (an ``nnx.Module``; use it directly inside ``jit`` with ids).
      tokenizer: a callable like ``transformers.CLIPTokenizer`` (``None``: only token ids accepted,
        or the model ignores text).
    """

    name: str
    model: RewardModel
    tokenizer: Callable | None = None

    @property
    def context_length(self) -> int:
        return self.model.context_length

    def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
        """Prompt strings -> ``(len(prompts), context_length)`` int32 ids (host side, not jittable).

        Raises:
          ValueError: no tokenizer was given and the model needs text, or ``prompts`` is empty.
        """
        if self.context_length == 0:
            return np.zeros((len(prompts), 0), np.int32)
        if self.tokenizer is None:
            raise ValueError(f"reward {self.name!r}: no tokenizer loaded; pass token ids (B, {self.context_length}) instead of strings")
        return tokenize_with(self.tokenizer, prompts, self.context_length)

    def __call__(self, frames, prompts=None) -> jax.Array:
        """``frames (B, H, W, 3)`` in ``[0, 1]``; ``prompts``: a list of strings (tokenized here) or ids
        ``(B|1, L)``. Returns ``(B,)`` float32."""
        if prompts is not None and not hasattr(prompts, "shape") and len(prompts) and isinstance(prompts[0], str):
            prompts = self.tokenize(prompts)
        return self.model(jnp.asarray(frames), prompts)
