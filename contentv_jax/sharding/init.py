"""Create or load a model directly into its shardings, never materialising it unsharded.

``nnx.eval_shape`` builds the model abstractly (shapes, dtypes and the parameters' logical
``out_sharding`` names, no memory); the logical rules turn the names into ``NamedSharding``s on the
mesh; then either a jitted initialiser with those ``out_shardings`` writes each device's shard in
place, or ``contentv_jax.checkpoints.load_sharded`` restores our checkpoint straight into them (each
process reads only the slices its devices hold). This is the flax NNX "sharded init" recipe with logical axis rules.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from contentv_jax.sharding.logical import DEFAULT_RULES, LogicalRules, spec_for


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def state_shardings(abstract_state: Any, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> Any:
    """``NamedSharding``s (same tree as ``abstract_state``) from each variable's ``out_sharding`` names."""

    def one(var):
        names = var.get_metadata().get("out_sharding")
        return var.replace(NamedSharding(mesh, spec_for(tuple(var.get_value().shape), names, mesh, rules)))

    return jax.tree.map(one, abstract_state, is_leaf=_is_var)


def abstract_sharded(factory: Callable[[], nnx.Module], mesh: Mesh, rules: LogicalRules = DEFAULT_RULES):
    """``(graphdef, abstract_state, shardings)`` of ``factory()`` without allocating it.

    ``abstract_state`` leaves are ``jax.ShapeDtypeStruct``s carrying their target sharding (the form
    Orbax restores into).
    """
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(factory)
    graphdef, state = nnx.split(abstract)
    shardings = state_shardings(state, mesh, rules)
    target = jax.tree.map(
        lambda v, s: v.replace(jax.ShapeDtypeStruct(v.get_value().shape, v.get_value().dtype, sharding=s.get_value())),
        state, shardings, is_leaf=_is_var,
    )
    return graphdef, target, shardings


def create_sharded(factory: Callable[[], nnx.Module], mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> nnx.Module:
    """Build ``factory()`` with every variable created directly in its sharding on ``mesh``.

    Args:
      factory: a zero-argument callable returning the module (e.g. ``lambda: MMDiT(cfg, rngs=nnx.Rngs(0))``);
        it is traced, never run eagerly, so it must be a pure function of its closure.
      mesh, rules: where the parameters' logical names put them (default: ``embed`` over ``fsdp``).
    Returns:
      the module, its arrays laid out as :func:`state_shardings` says; the same values ``factory()``
      gives on one device.
    """
    graphdef, _, shardings = abstract_sharded(factory, mesh, rules)

    @jax.jit
    def init():
        with nnx.use_eager_sharding(False):
            state = nnx.state(factory())
        return jax.lax.with_sharding_constraint(state, shardings)

    return nnx.merge(graphdef, init())


def bytes_per_device(tree: Any) -> dict:
    """``{device: bytes}`` of the arrays in ``tree`` that each addressable device holds."""
    out: dict = {}
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.Array):
            for shard in leaf.addressable_shards:
                out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out
