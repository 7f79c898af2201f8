"""The EMA warm-up and the logged learning rate, against diffusers' ``EMAModel`` and optax's own count.

The real jitted train step (``make_train_step``) of a toy model runs 50 steps with a non-finite batch
in the middle; diffusers' ``EMAModel`` (``diffusers/training_utils.py``) is stepped on the same
parameters after every applied update and must hold the same EMA within 1e-6.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.training_utils import EMAModel
from flax import nnx

from contentv_jax.train.config import TrainConfig
from contentv_jax.train.optim import applied_updates, ema_decay, ema_update, learning_rate_schedule, make_optimizer
from contentv_jax.train.trainer import make_train_step


class _Toy(nnx.Module):
    """A one-layer velocity model with the MM-DiT call signature."""

    def __init__(self, rngs):
        self.lin = nnx.Linear(4, 4, rngs=rngs)
        self.ctx = nnx.Linear(3, 4, rngs=rngs)

    def __call__(self, latents, timestep, context, pooled):
        return self.lin(latents) + self.ctx(context).mean(1)[:, None, None, None] + timestep[:, None, None, None, None] * 1e-3


@pytest.mark.parametrize("max_decay", [0.9999, 0.8])  # 0.8: the cap min(decay, .) is reached at step 36
def test_train_step_ema_matches_diffusers_ema_model(max_decay):
    cfg = TrainConfig()
    cfg.model.dtype = "float32"
    cfg.data.caption_dropout = 0.0
    cfg.optimizer.lr, cfg.optimizer.warmup_steps, cfg.optimizer.ema_decay = 0.05, 10, max_decay
    model = _Toy(nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    pure = nnx.to_pure_dict(params)
    tx = make_optimizer(cfg.optimizer)
    state = {"step": jnp.zeros((), jnp.int32), "rng": jax.random.key_data(jax.random.key(0)), "params": pure,
             "opt_state": tx.init(pure), "ema": jax.tree.map(jnp.copy, pure)}
    step = jax.jit(make_train_step(graphdef, template, rest, tx, cfg, jnp.zeros((2, 3)), jnp.zeros((2,))))
    lr_fn = learning_rate_schedule(cfg.optimizer)

    leaves = lambda tree: [np.asarray(x, np.float32) for x in jax.tree.leaves(tree)]  # noqa: E731
    shadow = [torch.nn.Parameter(torch.from_numpy(x.copy())) for x in leaves(pure)]
    ref = EMAModel(shadow, decay=max_decay)  # use_ema_warmup=False: (1 + s) / (10 + s), capped at decay
    rng = np.random.default_rng(0)
    applied = 0
    for i in range(50):
        batch = {"latents": jnp.asarray(rng.normal(size=(2, 1, 2, 2, 4)), jnp.float32),
                 "prompt_embeds": jnp.asarray(rng.normal(size=(2, 2, 3)), jnp.float32),
                 "pooled": jnp.zeros((2, 2), jnp.float32)}
        if i == 20:  # a skipped step: neither the EMA nor optax's count may advance
            batch["latents"] = batch["latents"].at[0, 0, 0, 0, 0].set(jnp.nan)
        state, m = step(state, batch)
        # the logged LR is the one this step's update used: optax's schedule at its own count
        assert float(m["lr"]) == pytest.approx(float(lr_fn(applied)), rel=1e-6, abs=0)
        if bool(m["finite"]):
            applied += 1
            ref.step([torch.nn.Parameter(torch.from_numpy(x.copy())) for x in leaves(state["params"])])
        else:
            assert i == 20
        assert int(applied_updates(state["opt_state"])) == applied
    assert applied == 49 and int(state["step"]) == 50
    for ours, theirs in zip(leaves(state["ema"]), ref.shadow_params):
        np.testing.assert_allclose(ours, theirs.detach().numpy(), rtol=0, atol=1e-6)
    # the EMA is not the raw weights (the average really lags behind)
    assert max(np.abs(a - b).max() for a, b in zip(leaves(state["ema"]), leaves(state["params"]))) > 1e-3


def test_ema_decay_schedule_closed_form_and_5000_step_simulation():
    # diffusers' get_decay: 0 at the first update, then min(decay, (1 + s) / (10 + s)), s = prior updates
    ref = EMAModel([torch.nn.Parameter(torch.zeros(1))], decay=0.9999)
    for s in (0, 1, 2, 9, 100, 4999, 200_000):
        assert float(ema_decay(0.9999, s)) == pytest.approx(ref.get_decay(s + 1), rel=1e-7, abs=0)

    # 5,000 updates (VAE adaptation, SFT) at decay 0.9999: the share of the initial weights left in the EMA.
    # Params jump to 0 after the first update, so the EMA's value is exactly the initial weights' share.
    def simulate(warmup: bool):
        def body(s, ema):
            d = ema_decay(0.9999, s) if warmup else jnp.float32(0.9999)
            return ema_update(ema, {"w": jnp.zeros(())}, d)

        return float(jax.jit(lambda: jax.lax.fori_loop(0, 5000, body, {"w": jnp.ones(())}))()["w"])

    assert simulate(warmup=True) < 0.01
    assert simulate(warmup=False) == pytest.approx(0.9999**5000, rel=1e-3)  # 61 %: what the warm-up fixes
    # stronger: the weights of the *first* update also keep < 1 % (the product of the decays after it)
    first_share = np.prod([float(ema_decay(0.9999, s)) for s in range(1, 5000)])
    assert first_share < 0.01
