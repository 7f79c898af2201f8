"""A training checkpoint's weights read back for sampling: the EMA when the run keeps one, else the parameters,
exactly as saved, without the optimizer state (``contentv_jax.runs.load_checkpoint_transformer``)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from contentv_jax import runs
from contentv_jax.models import transformer as T
from contentv_jax.train.checkpoint import TrainCheckpointer


def _flat(pure):
    return {"/".join(map(str, k)): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(pure)[0]}


def test_checkpoint_weights_are_the_ema_else_the_params(tmp_path):
    cfg = T.get_config("tiny")
    pure = nnx.to_pure_dict(nnx.state(T.init_model(cfg, seed=1), nnx.Param))
    ema = jax.tree.map(lambda x: x * 2 + 1, pure)
    for name, with_ema in (("ema", True), ("plain", False)):
        run = tmp_path / name
        state = {"step": jnp.int32(3), "rng": jax.random.key_data(jax.random.key(0)), "params": pure,
                 "opt_state": optax.adam(1e-3).init(pure), "ema": ema if with_ema else None}
        ckpt = TrainCheckpointer(run / runs.CHECKPOINTS, every=1, keep=2, async_save=False)
        ckpt.save(3, state, {"pos": 3})
        ckpt.close()
        (run / runs.CONFIG_YAML).write_text("run_dir: x\n")
        (run / runs.MODEL_CONFIG).write_text(json.dumps(cfg.to_dict()))
        src = runs.resolve(run)  # no export: the latest checkpoint
        assert src.step == 3 and src.checkpoint == run / runs.CHECKPOINTS / "3"
        assert runs.checkpoint_weight_paths(src.checkpoint)[0] == ("ema" if with_ema else "params")
        model = runs.load_checkpoint_transformer(src)
        got = _flat(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
        want = _flat(ema if with_ema else pure)
        assert got.keys() == want.keys() and len(got) > 50
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
        # the model runs: velocity of the right shape
        x = jnp.zeros((1, 1, 4, 4, cfg.in_channels))
        v = model(x, jnp.full((1,), 500.0), jnp.zeros((1, 5, cfg.joint_attention_dim)), jnp.zeros((1, cfg.pooled_projection_dim)))
        assert v.shape == x.shape
