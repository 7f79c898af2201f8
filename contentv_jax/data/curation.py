"""Curated training data (ContentV report, arXiv 2506.05343, sections 3.2 and 6.1): which caption a sample trains on
when a clip has several (a short and a long one in the report's SFT data), and which records a curated
subset keeps (the report's SFT set: the top 10 % by aesthetic score and by motion)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from contentv_jax.config import ConfigError

__all__ = ["CAPTION_KINDS", "draw_caption", "filter_records", "validate_filter", "validate_caption_weights"]

# Kinds of caption a clip may carry (captions.jsonl fields): ``caption`` (the plain field and every entry
# of a ``captions`` list), ``short`` (``short_caption``), ``long`` (``long_caption``).
CAPTION_KINDS = ("caption", "short", "long")
_CAPTION_STREAM = 0x5F7  # separates the caption draw's random stream from other uses of the run seed


def validate_caption_weights(weights: Mapping[str, Any] | None, key: str = "data.caption_weights") -> dict[str, float]:
    """Check ``data.caption_weights`` (kind -> weight >= 0, kinds from :data:`CAPTION_KINDS`, not all 0).
    Raises ConfigError naming the key."""
    out = {}
    for kind, w in (weights or {}).items():
        if kind not in CAPTION_KINDS:
            raise ConfigError(f"config key '{key}.{kind}': unknown caption kind; expected one of {list(CAPTION_KINDS)}")
        try:
            w = float(w)
        except (TypeError, ValueError):
            raise ConfigError(f"config key '{key}.{kind}': expected a number, got {w!r}") from None
        if w < 0:
            raise ConfigError(f"config key '{key}.{kind}': must be >= 0, got {w}")
        out[kind] = w
    if out and sum(out.values()) <= 0:
        raise ConfigError(f"config key '{key}': at least one weight must be > 0, got {out}")
    return out


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
