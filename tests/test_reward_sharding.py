"""Reward models shard by their logical names: built on a (2, 2, 2) mesh they score like on one device."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType


def test_mps_on_a_mesh_equals_single_device():
    from contentv_jax.models.reward import CLIPConfig, CLIPTextConfig, CLIPVisionConfig, MPSConfig, build_reward
    from contentv_jax.sharding.init import create_sharded

    t = CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=16)
    v = CLIPVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                         patch_size=8)
    cfg = MPSConfig(clip=CLIPConfig(t, v, projection_dim=32), layer_num=2, heads=2, dim_head=8, condition_ids=tuple(range(16)))
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "sequence"), axis_types=(AxisType.Auto,) * 3)
    single = build_reward("mps", cfg, seed=0)
    sharded = create_sharded(lambda: build_reward("mps", cfg, seed=0), mesh)
    assert sharded.cross_model.layers[0].cross_attn.to_q.kernel[...].sharding.spec == jax.sharding.PartitionSpec("fsdp")
    rng = np.random.default_rng(0)
    frames = jnp.asarray(rng.random((4, 40, 40, 3), dtype=np.float32))
    ids = jnp.asarray(rng.integers(0, 100, (4, 16)))
    call = nnx.jit(lambda m, f, i: m(f, i))
    a, b = np.asarray(call(single, frames, ids)), np.asarray(call(sharded, frames, ids))
    assert np.abs(a).max() > 0.1
    np.testing.assert_allclose(b, a, atol=1e-5, rtol=0)
