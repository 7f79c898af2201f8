"""Mesh from config, Ulysses joint attention vs the single-device reference, sharded create/load,
and the distributed helpers (8 simulated CPU devices, one process)."""

import argparse
import logging

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from contentv_jax.models.attention import joint_attention, joint_attention_local
from contentv_jax.sharding import distributed
from contentv_jax.checkpoints import REPLICA_PARALLEL_MIN_BYTES, load_checkpoint, load_sharded, save_checkpoint
from contentv_jax.sharding.init import bytes_per_device, create_sharded
from contentv_jax.sharding.logical import DEFAULT_RULES, activation_sharding, spec_for
from contentv_jax.sharding.mesh import MeshConfig, create_mesh


def test_mesh_hybrid_sizes_and_errors():
    cfg = MeshConfig(data=4, fsdp=-1, sequence=2, dcn_data=2)
    assert cfg.resolve(32) == (4, 4, 2)
    assert cfg.resolve_hybrid(32, 2) == ((2, 4, 2), (2, 1, 1))
    assert MeshConfig(data=-1, fsdp=4, dcn_data=-1).resolve_hybrid(16, 4) == ((1, 4, 1), (4, 1, 1))
    with pytest.raises(ValueError, match="dcn_fsdp=2 does not divide fsdp=1"):
        MeshConfig(data=2, fsdp=1, dcn_fsdp=2).resolve_hybrid(2, 2)
    with pytest.raises(ValueError, match="multiply to 6"):
        MeshConfig(data=2, fsdp=3, sequence=1).resolve(8)
    with pytest.raises(ValueError, match="equal slices"):
        MeshConfig(dcn_data=3).resolve_hybrid(8, 3)
    mesh = create_mesh(MeshConfig(data=2, fsdp=-1, sequence=2))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "sequence": 2}


def _joint_inputs(b, s_img, s_txt, n, d=8, seed=0):
    ks = jax.random.split(jax.random.key(seed), 6)
    return [jax.random.normal(k, (b, s_img if i < 3 else s_txt, n, d)) for i, k in enumerate(ks)]


def _loss(attn):
    w_img, w_txt = 1.0, -0.5

    def f(*xs):
        oi, ot = attn(*xs)
        return (w_img * jnp.sin(oi)).sum() + (w_txt * ot * ot).sum()

    return f


# (mesh (data, fsdp, sequence), batch, video tokens, heads): 6 heads / 13 tokens do not divide sp=4;
# tests/test_sharding_model.py runs the whole model on the four meshes of the issue
CASES = [((2, 1, 4), 2, 13, 6), ((1, 2, 4), 1, 16, 8)]


@pytest.mark.parametrize("shape,b,s_img,n", CASES, ids=[str(c[0]) for c in CASES])
def test_ulysses_matches_single_device(shape, b, s_img, n):
    xs = _joint_inputs(b, s_img, 5, n)
    mesh = create_mesh(MeshConfig(*shape))

    def sharded(*a):
        with activation_sharding(mesh):
            return joint_attention(*a)

    grad = jax.grad(_loss(sharded), argnums=tuple(range(6)))
    # acceptance 4: the Ulysses path runs: the forward has 4 all-to-alls (q, k, v to heads; the output back
    # to tokens); the gradient has them again (its forward) plus their 4 transposes (the backward)
    n_fwd = jax.jit(sharded).lower(*xs).as_text().count("stablehlo.all_to_all")
    n_grad = jax.jit(grad).lower(*xs).as_text().count("stablehlo.all_to_all")
    assert (n_fwd, n_grad - n_fwd) == (4, 4), (n_fwd, n_grad)
    oi, ot = jax.jit(sharded)(*xs)
    grads = jax.jit(grad)(*xs)
    ri, rt = joint_attention_local(*xs)
    ref_grads = jax.grad(_loss(joint_attention_local), argnums=tuple(range(6)))(*xs)
    np.testing.assert_allclose(np.asarray(oi), np.asarray(ri), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(ot), np.asarray(rt), rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-5)
    if s_img % shape[2] == 0:  # tokens that divide stay split over `sequence` after attention
        assert (tuple(oi.sharding.spec) + (None,) * 4)[1] == "sequence"


@pytest.mark.parametrize("kernel", ["chunked", "splash"])
def test_ulysses_with_other_kernels(kernel):
    """The kernels run per device inside the Ulysses shard_map (padded heads and tokens)."""
    xs = _joint_inputs(2, 13, 5, 6)
    mesh = create_mesh(MeshConfig(1, 2, 4))

    def sharded(*a):
        with activation_sharding(mesh):
            return joint_attention(*a, kernel=kernel)

    (oi, ot), grads = jax.jit(lambda *a: (sharded(*a), jax.grad(_loss(sharded), argnums=(0, 3))(*a)))(*xs)
    ri, rt = joint_attention_local(*xs)
    ref_grads = jax.grad(_loss(joint_attention_local), argnums=(0, 3))(*xs)
    np.testing.assert_allclose(np.asarray(oi), np.asarray(ri), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(ot), np.asarray(rt), rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-5)


def test_no_all_to_all_without_sequence_axis():
    xs = _joint_inputs(2, 13, 5, 6)
    mesh = create_mesh(MeshConfig(2, 4, 1))

    def sharded(*a):
        with activation_sharding(mesh):
            return joint_attention(*a)

    assert "all_to_all" not in jax.jit(sharded).lower(*xs).as_text()


class _Tiny(nnx.Module):
    """Parameters with the model's logical names (and one without metadata)."""

    def __init__(self, rngs):
        init = nnx.initializers.lecun_normal()
        self.proj = nnx.Linear(16, 32, kernel_init=nnx.with_partitioning(init, ("embed", "mlp")),
                               bias_init=nnx.with_partitioning(nnx.initializers.normal(), ("mlp",)), rngs=rngs)
        self.out = nnx.Param(init(rngs.params(), (32, 20)), out_sharding=("mlp", "embed"))
        self.scale = nnx.Param(jnp.full((3, 20), 2.0), out_sharding=("layers", "embed"))
        self.plain = nnx.Param(jnp.arange(5.0))


def _factory():
    return _Tiny(nnx.Rngs(0))


@pytest.fixture(scope="module")
def reference_state():
    with nnx.use_eager_sharding(False):
        return nnx.state(_factory())


def _strip(spec):
    """A spec without trailing replicated dimensions (P('fsdp') and P('fsdp', None) are the same layout)."""
    spec = tuple(spec)
    while spec and spec[-1] is None:
        spec = spec[:-1]
    return spec


def test_create_sharded_follows_rules_and_shrinks_bytes(reference_state):
    mesh = create_mesh(MeshConfig(data=2, fsdp=4, sequence=1))
    model = create_sharded(_factory, mesh)
    expect = {"proj.kernel": P("fsdp", None), "proj.bias": P(None), "out": P(None, "fsdp"),
              "scale": P(None, "fsdp"), "plain": P()}
    got = {".".join(map(str, k)): v.get_value().sharding.spec for k, v in nnx.to_flat_state(nnx.state(model))}
    assert {k: _strip(v) for k, v in got.items()} == {k: _strip(v) for k, v in expect.items()}
    ref_flat = dict(nnx.to_flat_state(reference_state))
    for k, v in nnx.to_flat_state(nnx.state(model)):
        np.testing.assert_allclose(np.asarray(v.get_value()), np.asarray(ref_flat[k].get_value()), rtol=1e-6, atol=1e-9)
    per_device = bytes_per_device(nnx.state(model))
    total = sum(v.get_value().nbytes for _, v in nnx.to_flat_state(reference_state))
    sharded_bytes = 4 * (16 * 32 + 32 * 20 + 3 * 20)  # the embed-sharded arrays
    assert set(per_device.values()) == {total - sharded_bytes + sharded_bytes // 4}


def test_load_sharded_restores_into_shardings(tmp_path, reference_state):
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "ckpt" / "state", reference_state)
    mesh = create_mesh(MeshConfig(data=1, fsdp=8, sequence=1))
    model = load_sharded(tmp_path / "ckpt", _factory, mesh)
    assert model.proj.kernel.get_value().sharding.spec == P("fsdp", None)
    assert model.out.get_value().sharding.spec == P(None, None)  # 20 does not divide over fsdp=8: replicated
    np.testing.assert_array_equal(np.asarray(model.out.get_value()), np.asarray(reference_state["out"].get_value()))
    with pytest.raises(FileNotFoundError):
        load_sharded(tmp_path / "missing", _factory, mesh)


def test_save_writes_small_replicated_arrays_whole_and_large_ones_replica_parallel(tmp_path, caplog):
    """Orbax cuts an array replicated over devices into one slice per replica (an eager, compiled slice
    per device) only when a slice holds at least REPLICA_PARALLEL_MIN_BYTES; smaller arrays are written whole.
    Both round-trip exactly. Both arrays' first dimension divides over the 8 replicas (Orbax would otherwise
    write them whole anyway), and no other test uses their shapes (no slice is already compiled here)."""
    mesh = create_mesh(MeshConfig(data=2, fsdp=4, sequence=1))
    replicated = jax.sharding.NamedSharding(mesh, P())
    n_big = 8 * (REPLICA_PARALLEL_MIN_BYTES // 4 + 8)  # float32 on 8 replicas (P()): each eighth just over the floor
    rng = np.random.default_rng(0)
    arrays = {"small": rng.standard_normal((8, 37), np.float32), "big": rng.standard_normal((n_big,), np.float32)}

    def saved_slices(names):
        state = {k: jax.device_put(arrays[k], replicated) for k in names}
        dst = tmp_path / "_".join(names)
        with jax.log_compiles(), caplog.at_level(logging.WARNING, logger="jax._src.interpreters.pxla"):
            caplog.clear()
            save_checkpoint(dst, state, {"test": True})
        abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=replicated) for k, v in state.items()}
        back = load_checkpoint(dst, abstract)
        for k in names:
            np.testing.assert_array_equal(np.asarray(back[k]), arrays[k])
        return sum("Compiling jit(slice)" in r.getMessage() for r in caplog.records)

    assert saved_slices(["small"]) == 0
    assert saved_slices(["big"]) > 0  # the control: a large replicated array is still saved replica-parallel


def test_spec_for_drops_non_dividing_axes():
    mesh = create_mesh(MeshConfig(data=2, fsdp=2, sequence=2))
    assert spec_for((4, 6), ("activation_batch", "activation_embed"), mesh, DEFAULT_RULES) == P(("data", "fsdp"), "fsdp")[:1] + P(None)
    assert spec_for((2, 6), ("activation_batch", "activation_embed"), mesh) == P("data", None)
    with pytest.raises(ValueError, match="rank 1"):
        spec_for((4,), ("activation_batch", "activation_embed"), mesh)


def test_distributed_args_and_single_process():
    parser = distributed.add_distributed_args(argparse.ArgumentParser())
    args = parser.parse_args(["--coordinator", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "1"])
    assert (args.coordinator, args.num_processes, args.process_id) == ("127.0.0.1:1234", 2, 1)
    assert distributed.initialize(None, 1, 0) is False
    assert distributed.initialize_from_args(parser.parse_args([])) is False
    with pytest.raises(ValueError, match="HOST:PORT"):
        distributed.initialize("localhost", 2, 0)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        distributed.initialize("localhost:1", 2, 5)
    with pytest.raises(ValueError, match="needs --coordinator"):
        distributed.initialize(None, 2, 0)
    assert distributed.is_main_process()
    mesh = create_mesh(MeshConfig(data=2, fsdp=2, sequence=2))
    spec = P(("data", "fsdp"))
    assert distributed.local_batch_slice(8, mesh, spec) == slice(0, 8)
    batch = distributed.global_batch({"x": np.arange(16.0).reshape(8, 2)}, mesh, spec)
    assert batch["x"].sharding.spec == spec
    np.testing.assert_array_equal(np.asarray(batch["x"]), np.arange(16.0).reshape(8, 2))
