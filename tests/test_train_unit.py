"""Trainer pieces against closed forms: flow-matching inputs/loss, caption dropout, LR schedule, EMA,
the non-finite skip, config errors and the Table 2 stage configs. Fast (tiny toy model, no data)."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from contentv_jax.config import ConfigError
from contentv_jax.train import loss as fm
from contentv_jax.train.config import OptimizerSection, TrainConfig, load_train_config
from contentv_jax.train.optim import ema_update, learning_rate_schedule, make_optimizer
from contentv_jax.train.trainer import make_train_step

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "train"


def test_noisy_latents_and_target_closed_form():
    rng = np.random.default_rng(0)
    x0 = rng.normal(size=(3, 2, 4, 4, 5)).astype(np.float32)
    noise = rng.normal(size=x0.shape).astype(np.float32)
    sigma = np.array([0.0, 0.3, 1.0], np.float32)
    x, target = fm.noisy_latents(jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(sigma))
    s = sigma[:, None, None, None, None]
    # diffusers FlowMatchEulerDiscreteScheduler.scale_noise: sigma * noise + (1 - sigma) * sample
    np.testing.assert_allclose(np.asarray(x), s * noise + (1 - s) * x0, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(x)[0], x0[0], rtol=0, atol=0)
    np.testing.assert_allclose(np.asarray(x)[2], noise[2], rtol=0, atol=0)
    np.testing.assert_allclose(np.asarray(target), noise - x0, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(fm.timesteps(jnp.asarray(sigma))), sigma * 1000)
    v = rng.normal(size=x0.shape).astype(np.float32)
    np.testing.assert_allclose(float(fm.velocity_mse(jnp.asarray(v), target)), np.mean((v - (noise - x0)) ** 2), rtol=1e-6)
    with pytest.raises(ValueError, match="sigma"):
        fm.noisy_latents(jnp.asarray(x0), jnp.asarray(noise), jnp.ones((2,)))


def test_caption_dropout_replaces_whole_samples():
    b, l, d, p = 64, 3, 4, 2
    ctx = jnp.arange(b * l * d, dtype=jnp.float32).reshape(b, l, d) + 1
    pooled = jnp.arange(b * p, dtype=jnp.float32).reshape(b, p) + 1
    e_ctx, e_pool = -jnp.ones((1, l, d)), -jnp.ones((1, p))
    key = jax.random.key(3)
    c0, p0 = fm.caption_dropout(key, ctx, pooled, e_ctx, e_pool, 0.0)
    assert (c0 == ctx).all() and (p0 == pooled).all()
    c1, p1 = fm.caption_dropout(key, ctx, pooled, e_ctx, e_pool, 1.0)
    assert (c1 == -1).all() and (p1 == -1).all()
    c, pl = fm.caption_dropout(key, ctx, pooled, e_ctx, e_pool, 0.25)
    dropped_c = np.asarray((c == -1).all(axis=(1, 2)))
    dropped_p = np.asarray((pl == -1).all(axis=1))
    kept = np.asarray((c == ctx).all(axis=(1, 2)))
    assert (dropped_c == dropped_p).all() and (dropped_c ^ kept).all()  # whole samples, text and pooled together
    expected = np.asarray(jax.random.uniform(key, (b,)) < 0.25)
    assert (dropped_c == expected).all() and 4 <= expected.sum() <= 28


def test_lr_schedule_warmup_constant_and_cosine():
    cfg = OptimizerSection(lr=1e-3, warmup_steps=10)
    f = learning_rate_schedule(cfg)
    np.testing.assert_allclose([float(f(s)) for s in (0, 5, 10, 500)], [0.0, 5e-4, 1e-3, 1e-3], rtol=1e-6)
    cfg = OptimizerSection(lr=1e-3, warmup_steps=10, schedule="cosine", decay_steps=110)
    f = learning_rate_schedule(cfg)
    np.testing.assert_allclose(float(f(60)), 1e-3 * 0.5 * (1 + np.cos(np.pi * 0.5)), rtol=1e-5)
    np.testing.assert_allclose(float(f(110)), 0.0, atol=1e-9)


def test_optimizer_is_clipped_adamw():
    cfg = OptimizerSection(lr=0.1, warmup_steps=0, grad_clip=1.0, weight_decay=0.0)
    tx = make_optimizer(cfg)
    params = {"w": jnp.zeros(4)}
    grads = {"w": jnp.array([30.0, 40.0, 0.0, 0.0])}  # norm 50 -> clipped to norm 1
    updates, _ = tx.update(grads, tx.init(params), params)
    g = np.array([0.6, 0.8, 0.0, 0.0])
    # first Adam step: m = (1-b1) g, v = (1-b2) g^2, bias-corrected -> g / (|g| + eps)
    expected = -0.1 * g / (np.abs(g) + 1e-8)
    np.testing.assert_allclose(np.asarray(updates["w"]), expected, rtol=1e-5, atol=1e-7)


def test_ema_update_closed_form():
    e = {"a": jnp.ones(3)}
    p = {"a": jnp.full(3, 3.0)}
    np.testing.assert_allclose(np.asarray(ema_update(e, p, 0.9)["a"]), 0.9 * 1 + 0.1 * 3, rtol=1e-6)


class _Toy(nnx.Module):
    """A one-layer velocity model with the MM-DiT call signature."""

    def __init__(self, rngs):
        self.lin = nnx.Linear(4, 4, rngs=rngs)
        self.ctx = nnx.Linear(3, 4, rngs=rngs)

    def __call__(self, latents, timestep, context, pooled):
        return self.lin(latents) + self.ctx(context).mean(1)[:, None, None, None] + timestep[:, None, None, None, None] * 1e-3


def _toy_step(cfg):
    model = _Toy(nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    pure = nnx.to_pure_dict(params)
    tx = make_optimizer(cfg.optimizer)
    state = {"step": jnp.zeros((), jnp.int32), "rng": jax.random.key_data(jax.random.key(0)), "params": pure,
             "opt_state": tx.init(pure), "ema": None}
    step = jax.jit(make_train_step(graphdef, template, rest, tx, cfg, jnp.zeros((2, 3)), jnp.zeros((2,))))
    return state, step


def test_nonfinite_loss_skips_the_update_and_finite_step_matches_reference():
    cfg = TrainConfig()
    cfg.model.dtype = "float32"
    cfg.data.caption_dropout = 0.0
    cfg.optimizer.warmup_steps = 0
    state, step = _toy_step(cfg)
    rng = np.random.default_rng(0)
    batch = {"latents": jnp.asarray(rng.normal(size=(2, 1, 2, 2, 4)), jnp.float32),
             "prompt_embeds": jnp.asarray(rng.normal(size=(2, 2, 3)), jnp.float32),
             "pooled": jnp.zeros((2, 2), jnp.float32)}
    before = jax.tree.map(np.asarray, state["params"])
    new, m = step(state, batch)
    assert bool(m["finite"]) and int(new["step"]) == 1
    # the loss equals an independent recomputation with the same draws
    key = jax.random.fold_in(jax.random.key(0), 0)
    k_noise, k_sigma, _ = jax.random.split(key, 3)
    noise = np.asarray(jax.random.normal(k_noise, (2, 1, 2, 2, 4)))
    sigma = np.asarray(jax.nn.sigmoid(jax.random.normal(k_sigma, (2,))))
    s = sigma[:, None, None, None, None]
    x0 = np.asarray(batch["latents"])
    xs = (1 - s) * x0 + s * noise
    w, b = before["lin"]["kernel"], before["lin"]["bias"]
    cw, cb = before["ctx"]["kernel"], before["ctx"]["bias"]
    v = xs @ w + b + (np.asarray(batch["prompt_embeds"]) @ cw + cb).mean(1)[:, None, None, None] + s * 1000 * 1e-3
    np.testing.assert_allclose(float(m["loss"]), np.mean((v - (noise - x0)) ** 2), rtol=1e-5)
    assert not np.allclose(np.asarray(new["params"]["lin"]["kernel"]), w)

    bad = dict(batch, latents=batch["latents"].at[0, 0, 0, 0, 0].set(jnp.nan))
    after_good = jax.tree.map(np.asarray, new["params"])
    opt_before = jax.tree.map(np.asarray, new["opt_state"])
    new2, m2 = step(new, bad)
    assert not bool(m2["finite"]) and int(new2["step"]) == 2
    for a, b_ in zip(jax.tree.leaves(after_good), jax.tree.leaves(new2["params"])):
        np.testing.assert_array_equal(a, np.asarray(b_))
    for a, b_ in zip(jax.tree.leaves(opt_before), jax.tree.leaves(new2["opt_state"])):
        np.testing.assert_array_equal(a, np.asarray(b_))


def test_unknown_key_and_impossible_shape_fail_naming_the_key():
    with pytest.raises(ConfigError, match="optimizer.lrr"):
        load_train_config(None, ["optimizer.lrr=1e-4"])
    with pytest.raises(ConfigError, match="buckets.max_height"):
        load_train_config(None, ["buckets.max_height=100"])
    with pytest.raises(ConfigError, match="buckets.max_frames"):
        load_train_config(None, ["buckets.max_frames=10"])
    with pytest.raises(ConfigError, match="buckets.image_fraction"):
        load_train_config(None, ["buckets.images=true", "buckets.batch_image=2", "buckets.image_fraction=0"])


def test_cli_bad_config_fails_before_any_work(tmp_path, capsys):
    from contentv_jax.train.__main__ import main

    assert main(["--run-dir", str(tmp_path / "run"), "model.nmae=tiny"]) == 2
    assert "model.nmae" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# Table 2 (reference doc section 5): max shape; total batch image / video; LR; steps
TABLE2 = {
    "vae_adaptation": ((1, 288, 288), (4096, 0), 1e-4, 5_000, (True, False)),
    "stage1": ((29, 288, 288), (4096, 2048), 1e-4, 40_000, (True, True)),
    "stage2": ((125, 288, 288), (4096, 512), 1e-4, 60_000, (True, True)),
    "stage3": ((125, 432, 768), (2048, 256), 5e-5, 30_000, (True, True)),
    "sft": ((125, 432, 768), (0, 256), 1e-5, 5_000, (False, True)),
}


@pytest.mark.parametrize("stage", sorted(TABLE2))
def test_stage_configs_follow_table2(stage):
    cfg = load_train_config(CONFIGS / f"{stage}.yaml")
    shape, (bi, bv), lr, steps, (images, videos) = TABLE2[stage]
    b = cfg.buckets
    assert (b.max_frames, b.max_height, b.max_width) == shape
    assert (b.batch_image if b.images else 0, b.batch_video if b.videos else 0) == (bi, bv)
    assert (b.images, b.videos) == (images, videos)
    assert cfg.optimizer.lr == lr and cfg.steps == steps
    assert cfg.model.name == "contentv-8b" and cfg.schedule.flow_shift == 1.0
    if images and videos:
        assert b.image_fraction == 0.5


@pytest.mark.parametrize(("steps", "start", "every", "built"), [(3, 0, 100, False), (250, 200, 100, False),
                                                                 (100, 0, 0, False), (120, 99, 100, True)])
def test_preview_sampler_only_when_a_preview_step_lies_ahead(tmp_path, monkeypatch, steps, start, every, built):
    """The preview sampler (text encoders, VAE) is built only when some step in (start, steps] is a multiple of
    logging.sample_every; a short run or a resumed tail past its last preview builds nothing."""
    from contentv_jax.train import trainer as T

    cfg = load_train_config(None, [f"run_dir={tmp_path}", f"steps={steps}", f"logging.sample_every={every}",
                                   "mesh.fsdp=1"])
    t = T.Trainer(cfg, devices=jax.devices()[:1])
    t.start_step = start

    def asset_dirs(self):  # where building the sampler starts: stop there, recording that it was reached
        raise RuntimeError("building the preview sampler")

    monkeypatch.setattr(T.Trainer, "_asset_dirs", asset_dirs)
    if built:
        with pytest.raises(RuntimeError, match="building the preview sampler"):
            t._preview()
    else:
        assert t._preview() is None
    assert not (tmp_path / "assets").exists()
