"""The tiny MM-DiT on sharded meshes equals the single-device model (issue 4, acceptance 1 and 4).

6 heads (sp = 4 or 8 do not divide them) and 3 x 3 x 3 = 27 video tokens (no sp divides them), so the
head padding, the token padding and the pad-key masking are all exercised.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from contentv_jax.models.transformer import MMDiT, get_config
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from contentv_jax.sharding.init import bytes_per_device, create_sharded, state_shardings
from contentv_jax.sharding.logical import DEFAULT_RULES, activation_sharding, logical_to_spec
from contentv_jax.sharding.mesh import MeshConfig, create_mesh

CFG = get_config("tiny", num_attention_heads=6, attention_head_dim=8, caption_projection_dim=48)
B = 4


def _factory():
    return MMDiT(CFG, rngs=nnx.Rngs(0))


def _inputs():
    ks = jax.random.split(jax.random.key(1), 5)
    latents = jax.random.normal(ks[0], (B, 3, 6, 6, CFG.in_channels))
    timestep = jax.random.uniform(ks[1], (B,)) * 1000.0
    context = jax.random.normal(ks[2], (B, 7, CFG.joint_attention_dim))
    pooled = jax.random.normal(ks[3], (B, CFG.pooled_projection_dim))
    target = jax.random.normal(ks[4], latents.shape)
    return latents, timestep, context, pooled, target


def _fwd_grad(graphdef):
    def loss(state, latents, timestep, context, pooled, target):
        out = nnx.merge(graphdef, state)(latents, timestep, context, pooled)
        return jnp.mean((out - target) ** 2), out

    def f(state, *batch):
        (value, out), grads = jax.value_and_grad(loss, has_aux=True)(state, *batch)
        return value, out, grads

    return f


@pytest.fixture(scope="module")
def reference():
    with nnx.use_eager_sharding(False):
        model = _factory()
    graphdef, state = nnx.split(model)
    batch = _inputs()
    value, out, grads = jax.jit(_fwd_grad(graphdef))(state, *batch)
    return graphdef, state, batch, (value, out, grads)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


@pytest.mark.parametrize("shape", [(1, 1, 8), (2, 2, 2), (1, 8, 1), (2, 1, 4)], ids=str)
def test_tiny_mmdit_sharded_equals_single_device(reference, shape):
    graphdef, state, batch, (ref_value, ref_out, ref_grads) = reference
    mesh = create_mesh(MeshConfig(*shape))
    with nnx.use_eager_sharding(False):
        shardings = state_shardings(nnx.state(nnx.eval_shape(_factory)), mesh)
    sharded_state = jax.device_put(state, shardings)
    f = _fwd_grad(graphdef)

    def run(st, *b):
        with activation_sharding(mesh):
            return f(st, *b)

    lowered = jax.jit(run).lower(sharded_state, *batch)
    # acceptance 4: with sequence > 1 the Ulysses all-to-alls are in the program, and only then
    assert ("all_to_all" in lowered.as_text()) == (shape[2] > 1)
    value, out, grads = lowered.compile()(sharded_state, *batch)
    assert _rel(value, ref_value) < 1e-5
    assert _rel(out, ref_out) < 1e-5
    worst = max((_rel(g, r), k) for (k, g), (_, r) in zip(nnx.to_flat_state(grads), nnx.to_flat_state(ref_grads)))
    assert worst[0] < 1e-5, worst


def test_sharded_create_follows_rules_and_shrinks_bytes(reference):
    """Acceptance 2 on the tiny MM-DiT: each parameter's sharding is the rules' spec of its logical
    names (``embed`` -> ``fsdp``, all else replicated), values equal the unsharded init, and the
    bytes each device holds are the replicated bytes plus the ``embed``-sharded bytes / fsdp."""
    _, state, _, _ = reference
    fsdp = 4
    mesh = create_mesh(MeshConfig(data=2, fsdp=fsdp, sequence=1))
    model = create_sharded(_factory, mesh)
    replicated = sharded = 0
    ref = dict(nnx.to_flat_state(state))
    for key, var in nnx.to_flat_state(nnx.state(model)):
        arr = var.get_value()
        names = var.get_metadata().get("out_sharding")
        expect = logical_to_spec(names, DEFAULT_RULES) if names else P()
        assert arr.sharding.is_equivalent_to(NamedSharding(mesh, expect), arr.ndim), (key, arr.sharding.spec, expect)
        np.testing.assert_allclose(np.asarray(arr), np.asarray(ref[key].get_value()), rtol=1e-6, atol=1e-7)
        if "fsdp" in jax.tree.leaves(tuple(expect)):
            sharded += arr.nbytes
        else:
            replicated += arr.nbytes
    assert sharded > 10 * replicated  # nearly every parameter has an `embed` axis
    assert set(bytes_per_device(nnx.state(model)).values()) == {replicated + sharded // fsdp}
