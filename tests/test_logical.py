"""Logical-axis rules: closed-form expectations for the spec translation and the no-mesh identity."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from contentv_jax.sharding.logical import DEFAULT_RULES, activation_sharding, constrain, logical_to_spec


def test_default_rules_translate():
    assert logical_to_spec(("embed", "mlp"), DEFAULT_RULES) == P("fsdp", None)
    assert logical_to_spec(("activation_batch", "activation_video_tokens", "activation_embed"), DEFAULT_RULES) == P(("data", "fsdp"), "sequence", None)
    # a mesh axis is used once per spec
    assert logical_to_spec(("embed", "embed")) == P("fsdp", None)


def test_constrain_identity_without_mesh_and_rank_check():
    x = jnp.arange(6.0).reshape(2, 3)
    np.testing.assert_array_equal(constrain(x, ("activation_batch", "activation_embed")), x)
    with pytest.raises(ValueError, match="rank 2"):
        constrain(x, ("activation_batch",))


def test_constrain_applies_sharding_under_mesh():
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "sequence"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    x = jnp.ones((4, 8, 3))
    with activation_sharding(mesh):
        y = jax.jit(lambda a: constrain(a * 2, ("activation_batch", "activation_video_tokens", None)))(x)
    assert y.sharding.spec == P(("data", "fsdp"), "sequence")
    np.testing.assert_array_equal(np.asarray(y), 2 * np.ones((4, 8, 3)))


def test_rules_from_config_and_batch_spec():
    from contentv_jax.sharding.logical import batch_spec, rules_from_config
    from contentv_jax.sharding.mesh import AXES, MeshConfig

    assert rules_from_config([], AXES) == DEFAULT_RULES and MeshConfig().logical_rules() == DEFAULT_RULES
    assert batch_spec(DEFAULT_RULES) == P(("data", "fsdp"))
    rules = MeshConfig(rules=[["activation_batch", "data"], ["embed", ["fsdp"]], ["mlp", None]]).logical_rules()
    assert rules == (("activation_batch", "data"), ("embed", "fsdp"), ("mlp", None))
    assert batch_spec(rules) == P("data")
    with pytest.raises(ValueError, match="not among"):
        rules_from_config([["embed", "model"]], AXES)
    with pytest.raises(ValueError, match="expected \\[logical name"):
        rules_from_config([["embed"]], AXES)


def test_parameter_and_activation_names_are_disjoint():
    """Parameters carry parameter names only (so an activation rule never moves a parameter)."""
    from flax import nnx

    from contentv_jax.models.transformer import abstract_model, get_config

    names = set()
    for _, var in nnx.to_flat_state(nnx.state(abstract_model(get_config("tiny")), nnx.Param)):
        names.update(n for n in var.get_metadata().get("out_sharding") or () if n)
    assert {"embed", "heads", "mlp", "layers"} <= names
    assert not [n for n in names if n.startswith("activation_")]
    assert not [n for n, _ in DEFAULT_RULES if n.startswith("activation_") and n in names]
