"""The RLHF step (contentv_jax.train.rlhf): exactness against the naive formulation and against PyTorch autograd
through the official pipeline's logic, first-frame decoding, flat memory in k, config errors.

One tiny float32 ContentV directory (diffusers layout: torch_npu_backend transformer, AutoencoderKLWan) loaded
through our converters; one tiny random transformers.CLIPModel as the reward. Shapes are fixed so that each
computation compiles once per module.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

from contentv_jax import scheduler as flow
from contentv_jax.config import ConfigError
from contentv_jax.train import rlhf
from tests.reward_fixtures import random_ids, tiny_hf_clip, torch_preprocess
from tests.rlhf_reference import official_rlhf_grad
from tests.sample_fixtures import TINY_SHIFT, TINY_TRANSFORMER, TINY_VAE, perturb_

STEPS, GUIDANCE, CHOSEN = 3, 4.0, np.array([0, 2])
B, FRAMES, HEIGHT, WIDTH, TEXT = 1, 5, 32, 32, 6
LATENT = (B, (FRAMES - 1) // 4 + 1, HEIGHT // 8, WIDTH // 8, 16)


def _flat(tree):
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def _rel(ours, ref):
    """max |ours - ref| / max |ref| over whole pytrees (flattened)."""
    a, b = _flat(ours), _flat(ref)
    return float(np.abs(a - b).max() / np.abs(b).max())


def _rel_l2(ours, ref):
    """||ours - ref|| / ||ref|| over whole pytrees (flattened)."""
    a, b = _flat(ours), _flat(ref)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Our models (loaded from the diffusers directory by our converters) and the torch ones."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler

    from contentv_jax.checkpoints import load_transformer, load_vae
    from contentv_jax.rewards_io import load_reward
    from torch_npu_backend.transformer import SD3Transformer3DModel

    root = tmp_path_factory.mktemp("rlhf_tiny")
    torch.manual_seed(0)
    perturb_(SD3Transformer3DModel(**{**TINY_TRANSFORMER, "num_layers": 2}), 0).save_pretrained(root / "transformer")
    perturb_(AutoencoderKLWan(**TINY_VAE), 1, 0.02).save_pretrained(root / "vae")
    FlowMatchEulerDiscreteScheduler(shift=TINY_SHIFT).save_pretrained(root / "scheduler")
    tiny_hf_clip(seed=0).save_pretrained(root / "clip")

    model = load_transformer(root / "transformer")
    graphdef, params_state, rest = nnx.split(model, nnx.Param, ...)
    rng = np.random.default_rng(0)
    cond = {
        "context": rng.normal(size=(B, TEXT, 64)).astype(np.float32),
        "pooled": rng.normal(size=(B, 32)).astype(np.float32),
        "negative_context": rng.normal(size=(B, TEXT, 64)).astype(np.float32),
        "negative_pooled": rng.normal(size=(B, 32)).astype(np.float32),
    }
    reward = load_reward("clip", root / "clip")
    r_graphdef, r_state = nnx.split(reward.model)
    torch_models = dict(
        transformer=SD3Transformer3DModel.from_pretrained(root / "transformer").eval(),
        vae=AutoencoderKLWan.from_pretrained(root / "vae").eval(),
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(root / "scheduler"),
        clip=tiny_hf_clip(seed=0),
    )
    return dict(
        cfg=model.cfg, apply=rlhf.make_apply(graphdef, params_state, rest, jnp.float32),
        params=nnx.to_pure_dict(params_state), vae=load_vae(root / "vae"),
        reward_apply=rlhf.make_reward_apply(r_graphdef), reward_state=r_state,
        ids=random_ids(rng, B).astype(np.int32), cond={k: jnp.asarray(v) for k, v in cond.items()},
        x0=rng.standard_normal(LATENT).astype(np.float32), sigmas=flow.sampling_sigmas(STEPS, TINY_SHIFT),
        torch=torch_models,
    )


def _objective(t, frame=0):
    def objective(x_n):
        frames = rlhf.decode_frame(t["vae"], x_n, frame)
        r = t["reward_apply"](t["reward_state"], frames, jnp.asarray(t["ids"]))
        return jnp.mean(rlhf.reward_loss(r, 1.0, None)), r

    return objective


@pytest.fixture(scope="module")
def gradients(tiny):
    """Our RLHF gradient and jax.grad of the naive formulation, stop-gradient and chain modes."""
    t = tiny
    sigmas, x0, chosen = jnp.asarray(t["sigmas"]), jnp.asarray(t["x0"]), jnp.asarray(CHOSEN, jnp.int32)
    out = {}
    for chain in (False, True):
        ours = jax.jit(lambda p: rlhf.rlhf_gradient(
            t["apply"], p, x0, sigmas, t["cond"], chosen, _objective(t), guidance_scale=GUIDANCE, chain=chain))
        naive = jax.jit(jax.value_and_grad(lambda p: rlhf.naive_loss(
            t["apply"], p, x0, sigmas, t["cond"], CHOSEN, _objective(t), guidance_scale=GUIDANCE, chain=chain)))
        grads, loss, r, _ = ours(t["params"])
        naive_loss, naive_grads = naive(t["params"])
        out[chain] = dict(grads=grads, loss=float(loss), r=np.asarray(r), naive=naive_grads, naive_loss=float(naive_loss))
    return out


@pytest.mark.parametrize("chain", [False, True], ids=["stop_gradient", "chain"])
def test_gradient_equals_naive_formulation(gradients, chain):
    g = gradients[chain]
    err, err_max = _rel_l2(g["grads"], g["naive"]), _rel(g["grads"], g["naive"])
    norm = float(optax.tree.norm(g["naive"]))
    print(f"{'chain' if chain else 'stop-gradient'}: loss {g['loss']:.6f} (naive {g['naive_loss']:.6f}), "
          f"|grad| {norm:.3e}, rel err (L2) {err:.2e}, max abs err / max abs {err_max:.2e}")
    assert norm > 1e-4  # the gradient is not trivially zero
    assert g["loss"] == pytest.approx(g["naive_loss"], rel=1e-6)
    # float32, the naive loop a scan like the rollout (same latents): measured 1.9e-8 (L2) / 1.5e-7 (max) with
    # stop-gradient, 1.3e-7 / 1.6e-7 chained
    assert err < 1e-6 and err_max < 1e-6


def test_chain_differs_from_stop_gradient(gradients):
    # the chain terms (gradient through the model's input) are really there
    assert _rel(gradients[False]["grads"], gradients[True]["grads"]) > 1e-3


def test_gradient_equals_official_pipeline_autograd_in_torch(tiny, gradients):
    """PyTorch autograd through the official logic: sequential CFG, FlowMatchEulerDiscreteScheduler.step,
    .detach() on the inputs of the chosen steps, AutoencoderKLWan decode of the first latent frame, CLIPModel
    with the same differentiable preprocessing written in torch."""
    from converters.transformer import state_to_diffusers

    t, tm = tiny, tiny["torch"]
    clip = tm["clip"]
    ids = torch.from_numpy(t["ids"].astype(np.int64))

    def clip_reward(frames):
        pix = torch_preprocess(frames, clip.config.vision_config.image_size)
        img = clip.visual_projection(clip.vision_model(pixel_values=pix).pooler_output)
        txt = clip.text_projection(clip.text_model(input_ids=ids).pooler_output)
        img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
        return clip.logit_scale.exp() * (img * txt).sum(-1)

    c = {k: torch.from_numpy(np.asarray(v)) for k, v in t["cond"].items()}
    loss, r, ref = official_rlhf_grad(
        tm["transformer"], tm["scheduler"], tm["vae"], clip_reward,
        torch.from_numpy(t["x0"]).permute(0, 4, 1, 2, 3),
        (c["context"], c["pooled"], c["negative_context"], c["negative_pooled"]), STEPS, GUIDANCE, CHOSEN,
    )
    ours = state_to_diffusers(t["cfg"], gradients[False]["grads"])
    assert set(ours) == set(ref)
    names = sorted(ref)
    err = _rel([ours[n] for n in names], [ref[n] for n in names])
    err_l2 = _rel_l2([ours[n] for n in names], [ref[n] for n in names])
    worst = max(names, key=lambda n: np.abs(ours[n] - ref[n]).max())
    print(f"torch loss {loss:.6f} ours {gradients[False]['loss']:.6f}; reward {r} ours {gradients[False]['r']}; "
          f"gradient max abs err / max abs {err:.2e}, rel err (L2) {err_l2:.2e} (worst tensor {worst})")
    np.testing.assert_allclose(gradients[False]["r"], r, rtol=1e-4)
    assert err < 1e-4


# ------------------------------------------------------------------------------------------------ first frame only
@pytest.fixture(scope="module")
def three_latent_frames(tiny):
    z = np.random.default_rng(5).standard_normal((B, 3, HEIGHT // 8, WIDTH // 8, 16)).astype(np.float32)
    vae = tiny["vae"]
    full = np.asarray(jnp.clip(vae.decode(vae.denormalize(jnp.asarray(z))) / 2 + 0.5, 0.0, 1.0))
    return z, full


@pytest.mark.parametrize("frame", [0, 6])
def test_reward_frame_decode_and_gradient_support(tiny, three_latent_frames, frame):
    """Frame 0: only latent frame 0 is decoded and gets gradient; frame 6 (latent frame 2): decoded with the
    causal cache of frames 0 and 1 (no gradient through it), equal to frame 6 of the full decode."""
    z, full = three_latent_frames
    vae = tiny["vae"]

    def score(z):
        return jnp.sum(rlhf.decode_frame(vae, z, frame) ** 2)

    alone = np.asarray(jax.jit(lambda z: rlhf.decode_frame(vae, z, frame))(jnp.asarray(z)))
    g = np.asarray(jax.jit(jax.grad(score))(jnp.asarray(z)))
    latent = 0 if frame == 0 else (frame - 1) // 4 + 1
    err = np.abs(alone - full[:, frame]).max()
    print(f"frame {frame}: |alone - full decode| max {err:.2e}; |grad| per latent frame "
          f"{[float(np.abs(g[:, j]).max()) for j in range(3)]}")
    assert err < 1e-5
    assert np.abs(g[:, latent]).max() > 0
    assert all(np.all(g[:, j] == 0) for j in range(3) if j != latent)


def test_random_reward_frame_matches_static_frame(tiny, three_latent_frames):
    z, full = three_latent_frames
    f = jax.jit(lambda z, i: rlhf.decode_frame(tiny["vae"], z, i))
    for i in (0, 3, 8):
        np.testing.assert_allclose(np.asarray(f(jnp.asarray(z), jnp.int32(i))), full[:, i], atol=1e-5)


# ------------------------------------------------------------------------------------------------ memory and step
_COMPILED: dict = {}


def _compiled_step(t, k):
    """(compiled RLHF step with ``k`` chosen steps, (state, batch, aux)); compiled once per module and k."""
    if (id(t), k) not in _COMPILED:
        _COMPILED[id(t), k] = _compile_step(t, k)
    return _COMPILED[id(t), k]


def _compile_step(t, k):
    rcfg = rlhf.RLHFSection(num_steps=4, k=k, mode="random", guidance_scale=GUIDANCE, shift=TINY_SHIFT,
                            num_frames=FRAMES, height=HEIGHT, width=WIDTH, batch=B)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-5))
    vae_graphdef, vae_state = nnx.split(t["vae"])
    step = rlhf.make_rlhf_step(t["apply"], t["reward_apply"], vae_graphdef, tx, rcfg, LATENT)
    state = dict(step=jnp.int32(0), rng=jax.random.key_data(jax.random.key(0)), params=t["params"],
                 opt_state=tx.init(t["params"]))
    batch = {**t["cond"], "input_ids": jnp.asarray(t["ids"])}
    aux = dict(vae=vae_state, reward=t["reward_state"], ref=None)
    return jax.jit(step).lower(state, batch, aux).compile(), (state, batch, aux)


def test_peak_memory_flat_in_k(tiny):
    peaks = {}
    for k in (1, 4):
        compiled, _ = _compiled_step(tiny, k)
        m = compiled.memory_analysis()
        peaks[k] = m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
    print(f"peak bytes k=1 {peaks[1]:,}, k=4 {peaks[4]:,}, ratio {peaks[4] / peaks[1]:.3f}")
    assert peaks[4] <= 1.15 * peaks[1]


def test_step_updates_and_reports(tiny):
    compiled, (state, batch, aux) = _compiled_step(tiny, 4)  # the memory test's k=4 program, not a third compile
    new, m = compiled(state, batch, aux)
    assert bool(m["finite"]) and int(new["step"]) == 1
    chosen = np.asarray(m["chosen_steps"])
    assert chosen.shape == (4,) and len(set(chosen)) == 4 and np.all(np.diff(chosen) > 0)
    assert _rel(new["params"], state["params"]) > 0
    # a non-finite reward: update skipped, reported
    bad = dict(aux, vae=jax.tree.map(lambda a: a * jnp.nan, aux["vae"]))
    skipped, m = compiled(state, batch, bad)
    assert not bool(m["finite"])
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(skipped["params"]), jax.tree.leaves(state["params"])))


# ------------------------------------------------------------------------------------------------ steps and config
def test_choose_steps_modes():
    key = jax.random.key(3)
    r = np.asarray(rlhf.choose_steps(key, 50, 4, "random"))
    assert len(set(r)) == 4 and np.all(np.diff(r) > 0) and r.min() >= 0 and r.max() < 50
    np.testing.assert_array_equal(r, np.asarray(rlhf.choose_steps(key, 50, 4, "random")))  # same key, same steps
    u = np.asarray(rlhf.choose_steps(key, 50, 4, "uniform"))
    assert np.all(np.diff(u) == 12) and u[-1] < 50
    np.testing.assert_array_equal(np.asarray(rlhf.choose_steps(key, 50, 4, "last")), [46, 47, 48, 49])
    draws = np.stack([np.asarray(rlhf.choose_steps(jax.random.key(s), 10, 1, "random")) for s in range(200)])
    assert len(np.unique(draws)) == 10  # every step gets drawn


@pytest.mark.parametrize("field,value,match", [
    ("k", 0, "rlhf.k"), ("k", 11, "rlhf.k"), ("mode", "sometimes", "rlhf.mode"),
    ("num_frames", 28, "rlhf.num_frames"), ("reward_frame", 29, "rlhf.reward_frame"),
])
def test_config_errors(field, value, match):
    with pytest.raises(ConfigError, match=match):
        rlhf.validate_rlhf(dataclasses.replace(rlhf.RLHFSection(num_steps=10, num_frames=29), **{field: value}))
    with pytest.raises(ConfigError, match="chain"):
        rlhf.validate_rlhf(rlhf.RLHFSection(mode="chain", kl_weight=0.1))


def test_default_negative_prompt_is_the_samplers():
    from contentv_jax.pipeline import DEFAULT_NEGATIVE_PROMPT

    assert rlhf.RLHFSection().negative_prompt == DEFAULT_NEGATIVE_PROMPT
