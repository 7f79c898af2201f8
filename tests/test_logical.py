"""Logical-axis rules: closed-form expectations for the spec translation and the no-mesh identity."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from contentv_jax.sharding.logical import DEFAULT_RULES, activation_sharding, constrain, logical_to_spec


def test_default_rules_translate():
    assert logical_to_spec(("embed", "mlp"), DEFAULT_RULES) == P("fsdp", None)
    assert logical_to_spec(("batch", "video_tokens", "embed"), DEFAULT_RULES) == P(("data", "fsdp"), "sequence", None)
    # a mesh axis is used once per spec
    assert logical_to_spec(("embed", "embed")) == P("fsdp", None)


def test_constrain_identity_without_mesh_and_rank_check():
    x = jnp.arange(6.0).reshape(2, 3)
    np.testing.assert_array_equal(constrain(x, ("batch", "embed")), x)
    with pytest.raises(ValueError, match="rank 2"):
        constrain(x, ("batch",))


def test_constrain_applies_sharding_under_mesh():
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "sequence"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    x = jnp.ones((4, 8, 3))
    with activation_sharding(mesh):
        y = jax.jit(lambda a: constrain(a * 2, ("batch", "video_tokens", None)))(x)
    assert y.sharding.spec == P(("data", "fsdp"), "sequence")
    np.testing.assert_array_equal(np.asarray(y), 2 * np.ones((4, 8, 3)))
