"""Logical axis names -> mesh axes, and activation sharding constraints.

Parameters and activations are annotated with *logical* axis names (see ``docs/design.md``);
parameter names (``embed``, ``heads``, ``mlp``, ...) and activation names (``activation_batch``,
``activation_video_tokens``, ``activation_embed``, ...; MaxText's ``activation_*``) are disjoint, so
a rule for one never moves the other. A rules table maps each logical name to a mesh axis (or a tuple
of mesh axes, or ``None`` for replicated). This mirrors MaxText's ``logical_axis_rules`` and flax's
``nnx.logical_axis_rules``; a training config sets it as ``mesh.rules``.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Sequence
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

LogicalRules = tuple[tuple[str, Any], ...]

BATCH = "activation_batch"  # the batch dimension of every activation and training batch

# Parameters: shard the model width over `fsdp`, replicate over `data` (HYBRID_SHARD).
# Activations: batch over (data, fsdp); video tokens over `sequence` (Ulysses).
DEFAULT_RULES: LogicalRules = (
    (BATCH, ("data", "fsdp")),
    ("activation_video_tokens", "sequence"),
    ("embed", "fsdp"),
)


def rules_from_config(rules: Sequence[Sequence[Any]] | None, mesh_axes: Sequence[str]) -> LogicalRules:
    """A rules table from config data: ``[[logical name, mesh axis | [mesh axes] | null], ...]``;
    empty or ``None``: :data:`DEFAULT_RULES`.

    Raises:
      ValueError: an entry that is not a pair, a name that is not a string, or a mesh axis not in ``mesh_axes``.
    """
    if not rules:
        return DEFAULT_RULES
    out = []
    for i, entry in enumerate(rules):
        if not isinstance(entry, (list, tuple)) or len(entry) != 2 or not isinstance(entry[0], str):
            raise ValueError(f"rule {i}: expected [logical name, mesh axis or list of mesh axes or null], got {entry!r}")
        name, target = entry
        axes = () if target is None else (target,) if isinstance(target, str) else tuple(target)
        bad = [a for a in axes if a not in mesh_axes]
        if bad:
            raise ValueError(f"rule {i} ({name!r}): mesh axes {bad} are not among {tuple(mesh_axes)}")
        out.append((name, None if not axes else axes[0] if len(axes) == 1 else axes))
    return tuple(out)


def batch_spec(rules: LogicalRules = DEFAULT_RULES) -> PartitionSpec:
    """The ``PartitionSpec`` of a batch's leading dimension under ``rules`` (its :data:`BATCH` rule)."""
    return logical_to_spec((BATCH,), rules)

_ACTIVE: contextvars.ContextVar[tuple[Mesh, LogicalRules] | None] = contextvars.ContextVar(
    "contentv_jax_sharding", default=None
)


def logical_to_spec(names: Sequence[str | None], rules: LogicalRules = DEFAULT_RULES) -> PartitionSpec:
    """Translate logical axis names to a ``PartitionSpec`` under ``rules``.

    A mesh axis is used at most once per spec (the first logical name that claims it wins), as
    in MaxText, so that e.g. ``('embed', 'embed')`` shards only its first dimension.
    Unknown names and ``None`` map to replicated dimensions.
    """
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name in names:
        target = table.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a not in used)
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*out)


def spec_for(
    shape: Sequence[int], names: Sequence[str | None] | None, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES
) -> PartitionSpec:
    """The ``PartitionSpec`` the rules give logical ``names`` for an array of ``shape`` on ``mesh``.

    Like :func:`logical_to_spec`, then: mesh axes absent from ``mesh`` are dropped, and so are trailing
    mesh axes of a dimension whose size their product does not divide (that dimension is then split
    over fewer axes, or replicated; e.g. a batch of 2 on ``('data', 'fsdp')`` = (2, 2) goes on ``data``).
    ``names=None`` (no metadata) means replicated.

    Raises:
      ValueError: if ``len(names) != len(shape)``.
    """
    if names is None:
        return PartitionSpec()
    if len(names) != len(shape):
        raise ValueError(f"logical names {tuple(names)} do not match a shape of rank {len(shape)}: {tuple(shape)}")
    out = []
    for size, entry in zip(shape, logical_to_spec(names, rules)):
        axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
        axes = tuple(a for a in axes if a in mesh.shape)
        while axes and size % math.prod(mesh.shape[a] for a in axes):
            axes = axes[:-1]
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*out)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: LogicalRules = DEFAULT_RULES):
    """Within this context, :func:`constrain` applies ``rules`` on ``mesh``."""
    token = _ACTIVE.set((mesh, tuple(rules)))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active() -> tuple[Mesh, LogicalRules] | None:
    """The (mesh, rules) set by :func:`activation_sharding`, or ``None``."""
    return _ACTIVE.get()


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """``with_sharding_constraint`` by logical names; the identity when no mesh is active.

    The spec is :func:`spec_for` ``(x.shape, names, mesh, rules)``: dimensions the mesh axes do not
    divide are split over fewer axes rather than failing.

    Args:
      x: any array; ``len(names)`` must equal ``x.ndim``.
      names: one logical name (or ``None``) per dimension.
    Raises:
      ValueError: if ``len(names) != x.ndim``.
    """
    if len(names) != x.ndim:
        raise ValueError(f"constrain: got {len(names)} logical names {tuple(names)} for an array of rank {x.ndim}")
    ctx = _ACTIVE.get()
    if ctx is None:
        return x
    mesh, rules = ctx
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec_for(x.shape, names, mesh, rules)))
