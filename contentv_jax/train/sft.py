"""Supervised fine-tuning (ContentV report, arXiv 2506.05343, section 3.2 and Table 2): the velocity
regulariser against the frozen pre-trained model, the caption draw among several captions per clip,
and the curated-subset filter.

The regulariser. The report adds "KL-divergence penalties against the original pre-trained model's
outputs" without a formula. For flow matching, the per-step Euler transitions of the fine-tuned and the
reference model are Gaussians with the same variance whose means differ by ``dsigma * (v - v_ref)``, so
their KL is proportional to ``||v - v_ref||^2`` (the Flow-GRPO / DiffusionNFT regulariser). The SFT loss
on one noised input ``x_sigma`` is::

    L = mean((v - u)^2) + lambda * mean((v - sg(v_ref))^2),   u = noise - x0 (the flow-matching target)

which equals ``(1 + lambda) * mean((v - (u + lambda v_ref) / (1 + lambda))^2)`` plus a term free of the
trained parameters (:func:`blended_target`): the regularised loss is plain flow matching towards a
target pulled towards the reference's velocity.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from contentv_jax.config import ConfigError

__all__ = [
    "CAPTION_KINDS",
    "blended_target",
    "draw_caption",
    "filter_records",
    "regularised_loss",
    "validate_filter",
]

# Kinds of caption a clip may carry (captions.jsonl fields): ``caption`` (the plain field and every entry
# of a ``captions`` list), ``short`` (``short_caption``), ``long`` (``long_caption``).
CAPTION_KINDS = ("caption", "short", "long")
_CAPTION_STREAM = 0x5F7  # separates the caption draw's random stream from other uses of the run seed


def regularised_loss(
    velocity: jax.Array, target: jax.Array, v_ref: jax.Array | None, kl_weight: float
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """SFT loss ``mean((v - u)^2) + kl_weight * mean((v - sg(v_ref))^2)`` in float32.

    Args:
      velocity: the trained model's prediction ``v`` (B, T, H, W, C), any float dtype.
      target: the flow-matching target ``u = noise - x0``, same shape.
      v_ref: the frozen reference model's prediction on the same input, same shape; gradient-stopped
        here. Ignored (may be None) when ``kl_weight == 0``: the loss is then exactly the plain
        flow-matching loss, computed by the same operations.
      kl_weight: lambda >= 0, a Python float (static).
    Returns ``(loss, {"loss_fm": ..., "loss_kl": ...})`` float32 scalars (``loss_kl`` is 0 when disabled).
    Raises ValueError on mismatched shapes or a negative weight.
    """
    if kl_weight < 0:
        raise ValueError(f"kl_weight must be >= 0, got {kl_weight}")
    if velocity.shape != target.shape:
        raise ValueError(f"velocity {velocity.shape} and target {target.shape} must have the same shape")
    v = velocity.astype(jnp.float32)
    loss_fm = jnp.mean(jnp.square(v - target.astype(jnp.float32)))
    if kl_weight == 0:
        return loss_fm, {"loss_fm": loss_fm, "loss_kl": jnp.zeros((), jnp.float32)}
    if v_ref is None or v_ref.shape != velocity.shape:
        raise ValueError(f"v_ref must have the velocity's shape {velocity.shape}, got {getattr(v_ref, 'shape', None)}")
    loss_kl = jnp.mean(jnp.square(v - jax.lax.stop_gradient(v_ref.astype(jnp.float32))))
    return loss_fm + kl_weight * loss_kl, {"loss_fm": loss_fm, "loss_kl": loss_kl}


def blended_target(target: jax.Array, v_ref: jax.Array, kl_weight: float) -> jax.Array:
    """``(u + lambda v_ref) / (1 + lambda)``: the target whose plain MSE, times ``1 + lambda``, equals
    :func:`regularised_loss` up to a parameter-free constant (same gradients). float32, shape of ``target``."""
    u = target.astype(jnp.float32)
    return (u + kl_weight * v_ref.astype(jnp.float32)) / (1.0 + kl_weight)


# ------------------------------------------------------------------------------------------------ captions


def draw_caption(
    seed: int, step: int, row: int, kinds: Sequence[str], weights: Mapping[str, float] | None
) -> int:
    """Index of the caption that global batch row ``row`` trains on at ``step``.

    ``kinds``: the kind of each caption the row's clip carries (its record's ``caption_kinds``). With
    ``weights`` (``data.caption_weights``, e.g. ``{"short": 0.5, "long": 0.5}``) a kind is drawn with
    probability proportional to its weight among the kinds the clip has, then one caption of that kind
    uniformly; kinds without a weight are never drawn unless no kind of the clip has one (then every
    caption is equally likely). Without weights every caption is equally likely.

    The draw depends only on ``(seed, step, row)``: every host, every mesh and a resumed run draw the
    same caption. Raises ValueError for a clip without captions.
    """
    n = len(kinds)
    if n == 0:
        raise ValueError("a record without captions cannot train")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, _CAPTION_STREAM, int(step), int(row)]))
    if n == 1:
        return 0
    if weights:
        present = sorted(set(kinds), key=kinds.index)
        w = np.array([max(float(weights.get(k, 0.0)), 0.0) for k in present])
        if w.sum() > 0:
            kind = present[int(rng.choice(len(present), p=w / w.sum()))]
            idx = [i for i, k in enumerate(kinds) if k == kind]
            return idx[int(rng.integers(len(idx)))]
    return int(rng.integers(n))


# ------------------------------------------------------------------------------------------------ filter


def validate_filter(rules: Mapping[str, Any] | None, key: str = "data.filter") -> dict[str, dict[str, float]]:
    """Check ``data.filter``: ``{field: {"min": x, "max": y, "top": q, "bottom": q}}`` (any subset of the
    four per field; ``top`` / ``bottom`` are fractions in (0, 1]). Returns the rules as plain dicts.
    Raises ConfigError naming the key."""
    out: dict[str, dict[str, float]] = {}
    for field, rule in (rules or {}).items():
        if not isinstance(rule, Mapping) or not rule:
            raise ConfigError(f"config key '{key}.{field}': expected a mapping of min / max / top / bottom, got {rule!r}")
        clean = {}
        for op, v in rule.items():
            if op not in ("min", "max", "top", "bottom"):
                raise ConfigError(f"config key '{key}.{field}.{op}': unknown rule; expected min, max, top or bottom")
            try:
                v = float(v)
            except (TypeError, ValueError):
                raise ConfigError(f"config key '{key}.{field}.{op}': expected a number, got {v!r}") from None
            if op in ("top", "bottom") and not 0.0 < v <= 1.0:
                raise ConfigError(f"config key '{key}.{field}.{op}': a fraction in (0, 1] expected, got {v}")
            clean[op] = v
        out[str(field)] = clean
    return out


def filter_records(fields: Mapping[str, Sequence[float | None]], rules: Mapping[str, Mapping[str, float]]) -> np.ndarray:
    """Which records a curated subset keeps: a boolean mask over N records.

    ``fields``: per numeric field, its N values (None / NaN where a record lacks it; such a record fails
    every rule on that field). ``rules`` (:func:`validate_filter`): every rule of every field must hold.
    ``top: q`` keeps the ``ceil(q * n)`` highest values among the ``n`` records that have the field (ties
    at the boundary broken by record order, earlier first), ``bottom: q`` the lowest; ``min`` / ``max``
    are inclusive thresholds. The report's SFT subset (top 10 % by aesthetic score and by motion) is
    ``{"aesthetic": {"top": 0.1}, "motion": {"top": 0.1}}``: both ranks are taken over the whole set, then
    intersected. Raises ConfigError when a rule names a field no record has.
    """
    n = None
    keep = None
    for field, rule in rules.items():
        if field not in fields:
            raise ConfigError(
                f"config key 'data.filter.{field}': no record has the field {field!r}; records have {sorted(fields)}"
            )
        vals = np.array([np.nan if v is None else float(v) for v in fields[field]], dtype=np.float64)
        if n is None:
            n = len(vals)
            keep = np.ones(n, bool)
        have = ~np.isnan(vals)
        if not have.any():
            raise ConfigError(f"config key 'data.filter.{field}': no record has a value for {field!r}")
        ok = have.copy()
        if "min" in rule:
            ok &= np.where(have, vals, -np.inf) >= rule["min"]
        if "max" in rule:
            ok &= np.where(have, vals, np.inf) <= rule["max"]
        idx = np.flatnonzero(have)
        for op, sign in (("top", -1.0), ("bottom", 1.0)):
            if op in rule:
                m = int(np.ceil(rule[op] * len(idx) - 1e-9))
                order = idx[np.argsort(sign * vals[idx], kind="stable")]
                ranked = np.zeros(len(vals), bool)
                ranked[order[:m]] = True
                ok &= ranked
        keep &= ok
    if keep is None:
        return np.ones(len(next(iter(fields.values()), [])), bool)
    return keep
