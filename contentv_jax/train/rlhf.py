"""Reward-gradient fine-tuning (RLHF) of the MM-DiT: gradients of a differentiable reward through k sampling steps.

ContentV report (arXiv 2506.05343), section 6.2, Eq. 3 and Fig. 8: videos are sampled with N Euler steps
(classifier-free guidance as at sampling); on k of the steps, chosen at random, the model's parameters carry
gradient while its input is stop-gradiented (DRTune, arXiv 2405.00760, with random instead of evenly spaced
steps); only the first latent frame is decoded (the Wan VAE is causal); a reward model scores it and the
reward is maximised by backpropagation. No KL term in the report (``kl_weight`` adds one, optional).

The step here keeps peak memory at one ordinary training step whatever k is. With stop-gradient inputs

    x_N = x_0 + sum_i dsigma_i * v_theta(sg(x_i), sigma_i)      (dsigma_i = sigma_{i+1} - sigma_i)

so ``dL/dtheta = sum_{i in K} dsigma_i * (dv_theta(x_i)/dtheta)^T g`` with ``g = dL/dx_N``. Hence:

1. roll out without gradients in one compiled ``fori_loop`` (both CFG branches in one batched forward, as
   :mod:`contentv_jax.pipeline` samples), keeping only the k chosen inputs ``x_i`` (k latents: small);
2. ``g = grad(loss o reward o decode_frame o denormalize)(x_N)`` once, the VAE decoder under ``jax.checkpoint``,
   decoding one latent frame (the first by default);
3. accumulate the parameter gradient over the k stored inputs, one VJP at a time (a ``lax.scan`` carrying
   the gradient), each VJP through both CFG branches.

Modes of choosing the k steps (:func:`choose_steps`, drawn from ``fold_in(key(seed), step)``, so identical on
every host and after a resume): ``random`` (ContentV), ``uniform`` (DRTune: evenly spaced, random offset),
``last`` (DRaFT-K: the last k), and ``chain`` (DRaFT: no stop-gradient on the inputs; the gradient flows
through the sampler from x_N back to the first chosen step, by a reverse sweep over all N stored inputs,
one VJP at a time; the parameters carry gradient at the k chosen steps only).

Array layout is channels-last: latents ``(B, T, H, W, C)``, frames ``(B, H, W, 3)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from contentv_jax import scheduler as flow
from contentv_jax.config import ConfigError

MODES = ("random", "uniform", "last", "chain")
VAE_TEMPORAL_FACTOR = 4


@dataclasses.dataclass
class RLHFSection:
    """The RLHF step (ContentV report, section 6.2).

    ``num_steps``: Euler sampling steps N of the rollout. ``k``: steps that carry gradient, 1 <= k <= N.
    ``mode``: ``random`` | ``uniform`` | ``last`` | ``chain`` (see the module docstring).
    ``guidance_scale`` / ``shift``: CFG weight and flow shift of the rollout (as at sampling).
    ``reward_scale``: the loss is ``-reward_scale * r``; with ``reward_max`` set it is ``|reward_max - r|``.
    ``kl_weight``: weight of ``mean((v_theta(x_i) - v_ref(x_i))^2)`` at the k stored inputs against a frozen
    reference (the guided velocity); 0 disables; not available with ``chain``.
    ``reward_frame``: pixel frame scored: 0 (the first; decodes the first latent frame only), ``f`` > 0 (the
    latent frame holding it is decoded with the causal cache of the frames before it, which carry no
    gradient), or -1 (a frame drawn uniformly per step from the shared seed).
    ``num_frames`` / ``height`` / ``width``: rollout video size in pixels (frames 4k+1, sides multiples of 16).
    ``batch``: prompts per step (global). ``eval_every``: held-out reward every that many steps (0: never);
    ``eval_prompts``: file of held-out prompts; ``eval_batch``: how many of them are scored.
    ``negative_prompt``: the unconditional branch's prompt (default: the official demo's, bytedance/ContentV
    ``demo.py``, as ``contentv_jax.pipeline.DEFAULT_NEGATIVE_PROMPT``).
    """

    num_steps: int = 50
    k: int = 1
    mode: str = "random"
    guidance_scale: float = 6.0
    shift: float = flow.DEFAULT_SAMPLING_SHIFT
    reward_scale: float = 1.0
    reward_max: float | None = None
    kl_weight: float = 0.0
    reward_frame: int = 0
    num_frames: int = 29
    height: int = 432
    width: int = 768
    batch: int = 1
    eval_every: int = 0
    eval_prompts: str = ""
    eval_batch: int = 4
    negative_prompt: str = (
        "overexposed, low quality, deformation, a poor composition, bad hands, bad teeth, bad eyes, bad limbs, distortion"
    )


def validate_rlhf(r: RLHFSection, key: str = "rlhf") -> RLHFSection:
    """Raises :class:`contentv_jax.config.ConfigError` naming the key of a bad RLHF setting; returns ``r``."""

    def err(name, msg):
        raise ConfigError(f"config key '{key}.{name}': {msg}")

    if r.num_steps < 1:
        err("num_steps", f"must be >= 1, got {r.num_steps}")
    if r.k < 1 or r.k > r.num_steps:
        err("k", f"must be in [1, rlhf.num_steps={r.num_steps}], got {r.k}")
    if r.mode not in MODES:
        err("mode", f"must be one of {MODES}, got {r.mode!r}")
    if r.kl_weight < 0:
        err("kl_weight", f"must be >= 0, got {r.kl_weight}")
    if r.kl_weight > 0 and r.mode == "chain":
        err("kl_weight", "the velocity regulariser needs a stop-gradient mode (random, uniform, last), not chain")
    if r.num_frames < 1 or (r.num_frames - 1) % VAE_TEMPORAL_FACTOR:
        err("num_frames", f"must be 4k+1 (the causal VAE's 1 + 4k frames), got {r.num_frames}")
    for name, v in (("height", r.height), ("width", r.width)):
        if v < 16 or v % 16:
            err(name, f"must be a positive multiple of 16 (VAE 8x times patch 2), got {v}")
    if r.reward_frame < -1 or r.reward_frame >= r.num_frames:
        err("reward_frame", f"must be -1 (random) or a frame index in [0, {r.num_frames}), got {r.reward_frame}")
    if r.batch < 1:
        err("batch", f"must be >= 1, got {r.batch}")
    if r.shift <= 0:
        err("shift", f"must be > 0, got {r.shift}")
    if r.eval_every < 0:
        err("eval_every", f"must be >= 0, got {r.eval_every}")
    if r.eval_batch < 1:
        err("eval_batch", f"must be >= 1, got {r.eval_batch}")
    return r


# ------------------------------------------------------------------------------------------- choosing the steps
def choose_steps(key: jax.Array, num_steps: int, k: int, mode: str) -> jax.Array:
    """The k sampling steps that carry gradient, sorted ascending, int32 ``(k,)``.

    ``random`` (and ``chain``): k distinct steps uniformly at random from ``key``; ``uniform``: DRTune's evenly
    spaced steps ``offset + j * (N // k)`` with a random ``offset`` in ``[0, N - (k - 1) * (N // k))``;
    ``last``: ``N - k, ..., N - 1``. Raises ConfigError for k outside ``[1, N]`` or an unknown mode.
    """
    if not 1 <= k <= num_steps:
        raise ConfigError(f"config key 'rlhf.k': must be in [1, rlhf.num_steps={num_steps}], got {k}")
    if mode in ("random", "chain"):
        return jnp.sort(jax.random.choice(key, num_steps, (k,), replace=False)).astype(jnp.int32)
    if mode == "uniform":
        stride = num_steps // k
        offset = jax.random.randint(key, (), 0, num_steps - (k - 1) * stride)
        return (offset + stride * jnp.arange(k)).astype(jnp.int32)
    if mode == "last":
        return jnp.arange(num_steps - k, num_steps, dtype=jnp.int32)
    raise ConfigError(f"config key 'rlhf.mode': must be one of {MODES}, got {mode!r}")


# ------------------------------------------------------------------------------------------------- the velocity
def guided_velocity(apply: Callable, params, x, sigma, cond, guidance_scale: float):
    """The sampler's velocity at ``x`` (float32 ``(B, T, H, W, C)``) and ``sigma`` (scalar).

    ``apply(params, latents, timestep, context, pooled) -> velocity`` is the MM-DiT. With ``guidance_scale > 1``
    both CFG branches run in one batched forward (``[cond; uncond]``, as :mod:`contentv_jax.pipeline`) and
    ``v = v_uncond + g (v_cond - v_uncond)``; ``cond`` holds ``context``/``pooled`` (B, ...) and, for guidance,
    ``negative_context``/``negative_pooled`` (B, ...). Returns float32 ``(B, T, H, W, C)``.
    """
    guidance = guidance_scale > 1.0
    if guidance:
        x_in = jnp.concatenate([x, x], axis=0)
        context = jnp.concatenate([cond["context"], cond["negative_context"]], axis=0)
        pooled = jnp.concatenate([cond["pooled"], cond["negative_pooled"]], axis=0)
    else:
        x_in, context, pooled = x, cond["context"], cond["pooled"]
    timestep = jnp.full((x_in.shape[0],), sigma * flow.NUM_TRAIN_TIMESTEPS, jnp.float32)
    v = apply(params, x_in, timestep, context, pooled).astype(jnp.float32)
    if guidance:
        v_cond, v_uncond = jnp.split(v, 2, axis=0)
        v = v_uncond + guidance_scale * (v_cond - v_uncond)
    return v


def rollout(apply, params, x0, sigmas, cond, guidance_scale, store: jax.Array | None):
    """Euler sampling without gradients; returns ``(x_N, stored)``.

    ``store``: int32 ``(k,)`` step indices whose inputs are kept (``stored[j] = x_{store[j]}``), or None to
    keep every step's input (``stored`` ``(N, B, ...)``, the chain mode). ``sigmas``: ``(N + 1,)`` float32.
    """
    params = jax.lax.stop_gradient(params)
    n = sigmas.shape[0] - 1
    slots = n if store is None else store.shape[0]
    buf = jnp.zeros((slots, *x0.shape), jnp.float32)

    def body(i, carry):
        x, buf = carry
        if store is None:
            buf = jax.lax.dynamic_update_index_in_dim(buf, x, i, 0)
        else:
            hit = store == i
            pos = jnp.argmax(hit)
            old = jax.lax.dynamic_index_in_dim(buf, pos, 0, keepdims=False)
            buf = jax.lax.dynamic_update_index_in_dim(buf, jnp.where(jnp.any(hit), x, old), pos, 0)
        v = guided_velocity(apply, params, x, sigmas[i], cond, guidance_scale)
        return x + (sigmas[i + 1] - sigmas[i]) * v, buf

    x, buf = jax.lax.fori_loop(0, n, body, (x0.astype(jnp.float32), buf))
    return jax.lax.stop_gradient(x), jax.lax.stop_gradient(buf)


# ------------------------------------------------------------------------------------------------------ decoding
def decode_frame(vae, z_norm: jax.Array, frame) -> jax.Array:
    """One pixel frame of the decoded video, differentiable, float32 ``(B, H, W, 3)`` in [0, 1].

    ``z_norm``: normalised latents ``(B, T, h, w, z_dim)`` (the sampler's output). ``frame``: pixel frame index,
    a Python int (0: only the first latent frame is decoded; the causal VAE makes it the first frame of the full
    decode) or an int32 scalar (traced; the latent frame holding it is chosen at run time). For a frame in latent
    frame ``j >= 1`` the causal cache of latent frames ``0 .. j-1`` is built without gradient, then frame ``j`` is
    decoded with gradient: the reward's gradient reaches latent frame ``j`` only. The decoder runs under
    ``jax.checkpoint``. Post-processing as diffusers (``AutoencoderKLWan.decode`` clamps to [-1, 1],
    ``VideoProcessor`` maps ``x / 2 + 0.5`` and clips to [0, 1]).
    """
    from flax import nnx

    from contentv_jax.models.vae import _Cache

    ts = vae.config.temporal_scale
    graphdef, state = nnx.split(vae)

    @jax.checkpoint
    def decode_chunk(state, z, cache_in):
        # z: (B, 1, h, w, C) normalised; cache_in None for the first chunk. Returns (frames, new cache).
        model = nnx.merge(graphdef, state)
        x = model.post_quant_conv(model.denormalize(z.astype(jnp.float32)))[0]
        cache = _Cache(cache_in)
        y = model.decoder(x, cache)
        return jnp.clip(jnp.clip(y.astype(jnp.float32), -1.0, 1.0) / 2 + 0.5, 0.0, 1.0), cache.new

    if isinstance(frame, int) and frame == 0:
        return decode_chunk(state, z_norm[:, :1], None)[0][:, 0]

    t = z_norm.shape[1]
    frame = jnp.asarray(frame, jnp.int32)
    j = jnp.where(frame == 0, 0, (frame - 1) // ts + 1)
    sub = jnp.where(frame == 0, 0, (frame - 1) % ts)
    first, cache0 = decode_chunk(state, z_norm[:, :1], None)
    if t == 1:
        return first[:, 0]
    sg_state = jax.lax.stop_gradient(state)
    z_sg = jax.lax.stop_gradient(z_norm)

    def warm(i, cache):  # the causal cache after latent frames 1 .. i (no gradient)
        return decode_chunk(sg_state, jax.lax.dynamic_slice_in_dim(z_sg, i, 1, axis=1), cache)[1]

    cache = jax.lax.fori_loop(1, jnp.maximum(j, 1), warm, jax.lax.stop_gradient(cache0))
    later, _ = decode_chunk(state, jax.lax.dynamic_slice_in_dim(z_norm, jnp.maximum(j, 1), 1, axis=1), cache)
    later = jax.lax.dynamic_index_in_dim(later, sub, 1, keepdims=False)
    return jnp.where(j == 0, first[:, 0], later)


def reward_loss(r: jax.Array, reward_scale: float, reward_max: float | None) -> jax.Array:
    """Per-sample loss of rewards ``r`` (B,): ``-reward_scale * r``, or ``|reward_max - r|`` when set."""
    if reward_max is not None:
        return jnp.abs(reward_max - r)
    return -reward_scale * r


# ------------------------------------------------------------------------------------------------ the gradient
def _tree_add(a, b):
    return jax.tree.map(jnp.add, a, b)


def _tree_zeros(t):
    return jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), t)


def rlhf_gradient(
    apply: Callable,
    params,
    x0: jax.Array,
    sigmas: jax.Array,
    cond: dict,
    chosen: jax.Array,
    objective: Callable,
    *,
    guidance_scale: float,
    chain: bool = False,
    kl_weight: float = 0.0,
    ref_apply: Callable | None = None,
    ref_params=None,
):
    """The RLHF gradient, peak memory of one training step whatever k is.

    Args:
      apply: ``apply(params, latents, timestep, context, pooled) -> velocity`` (the MM-DiT).
      params: the trained parameters (a pytree of float32 arrays).
      x0: initial noise, float32 ``(B, T, h, w, C)``.
      sigmas: ``(N + 1,)`` float32 schedule (:func:`contentv_jax.scheduler.sampling_sigmas`).
      cond: text conditioning (see :func:`guided_velocity`).
      chosen: int32 ``(k,)`` sorted step indices (:func:`choose_steps`).
      objective: ``objective(x_N) -> (loss, aux)``, scalar loss of the final latents.
      chain: no stop-gradient on the model inputs (DRaFT): reverse sweep over all N stored inputs.
      kl_weight / ref_apply / ref_params: ``kl_weight * mean_j mean((v(x_j) - v_ref(x_j))^2)`` over the stored
        inputs, the reference velocity under stop-gradient (stop-gradient modes only).
    Returns:
      ``(grads, loss, aux, kl)``: gradient pytree like ``params`` (float32), the objective's loss and aux at
      x_N, and the velocity regulariser's value (0 when off).
    """
    k = chosen.shape[0]
    x_n, stored = rollout(apply, params, x0, sigmas, cond, guidance_scale, None if chain else chosen)
    (loss, aux), g = jax.value_and_grad(objective, has_aux=True)(x_n)
    g = g.astype(jnp.float32)

    def velocity(p, x, i):
        return guided_velocity(apply, p, x, sigmas[i], cond, guidance_scale)

    if not chain:

        def body(acc, j):
            i, x = chosen[j], stored[j]
            dsigma = sigmas[i + 1] - sigmas[i]
            v, vjp = jax.vjp(lambda p: velocity(p, x, i), params)
            ct = dsigma * g
            kl = jnp.zeros((), jnp.float32)
            if kl_weight > 0:
                v_ref = jax.lax.stop_gradient(
                    guided_velocity(ref_apply, ref_params, x, sigmas[i], cond, guidance_scale)
                )
                diff = v - v_ref
                kl = jnp.mean(diff**2) / k
                ct = ct + kl_weight * 2.0 * diff / (diff.size * k)
            (gp,) = vjp(ct)
            return _tree_add(acc, gp), kl

        grads, kls = jax.lax.scan(body, _tree_zeros(params), jnp.arange(k))
        kl = jnp.sum(kls)
        loss = loss + kl_weight * kl
        return grads, loss, aux, kl

    # chain: adjoint a_i = a_{i+1} + dsigma_i (dv/dx_i)^T a_{i+1} from a_N = g, swept from step N-1 down to the first
    # chosen step (earlier steps cannot change the parameter gradient); one VJP per step, its parameter part
    # counted at the chosen steps only.
    n = sigmas.shape[0] - 1
    first = chosen[0]

    def chain_body(carry, i):
        def vjp_step(carry):
            acc, a = carry
            dsigma = sigmas[i + 1] - sigmas[i]
            _, vjp = jax.vjp(lambda p, x: velocity(p, x, i), params, stored[i])
            gp, gx = vjp(dsigma * a)
            in_k = jnp.any(chosen == i)
            acc = jax.tree.map(lambda s, d: s + jnp.where(in_k, d, jnp.zeros_like(d)), acc, gp)
            return acc, a + gx

        return jax.lax.cond(i >= first, vjp_step, lambda c: c, carry), None

    (grads, _), _ = jax.lax.scan(chain_body, (_tree_zeros(params), g), jnp.arange(n - 1, -1, -1))
    return grads, loss, aux, jnp.zeros((), jnp.float32)


def naive_loss(
    apply, params, x0, sigmas, cond, chosen: np.ndarray, objective, *, guidance_scale, chain=False,
    kl_weight=0.0, ref_apply=None, ref_params=None,
):
    """The naive formulation (for tests): the whole Euler loop differentiable, parameters under stop-gradient
    except at the ``chosen`` steps, model inputs stop-gradiented at every step unless ``chain``. ``jax.grad`` of
    this equals :func:`rlhf_gradient`.

    The loop is a ``jax.lax.scan`` over the steps (not a Python loop): its body is the same program as
    :func:`rollout`'s, so both see the same float32 latents. An unrolled loop fuses differently; its x_N then
    differs from the rollout's by rounding (4e-7 relative on the test's tiny model), which the reward's gradient
    amplifies about fivefold, hiding the comparison this function exists for.
    """
    n = sigmas.shape[0] - 1
    hits = np.zeros(n, bool)
    hits[np.asarray(chosen, int)] = True
    k = int(hits.sum())

    def body(carry, inputs):
        x, kl = carry
        i, hit = inputs
        # gradient flows to the parameters only where ``hit``: where(hit, p, sg(p)) has the value p at every step
        p = jax.tree.map(lambda a: jnp.where(hit, a, jax.lax.stop_gradient(a)), params)
        x_in = x if chain else jax.lax.stop_gradient(x)
        v = guided_velocity(apply, p, x_in, sigmas[i], cond, guidance_scale)
        if kl_weight > 0:
            v_ref = jax.lax.stop_gradient(guided_velocity(ref_apply, ref_params, x_in, sigmas[i], cond, guidance_scale))
            kl = kl + jnp.where(hit, jnp.mean((v - v_ref) ** 2) / k, 0.0)
        return (x + (sigmas[i + 1] - sigmas[i]) * v, kl), None

    (x, kl), _ = jax.lax.scan(body, (x0.astype(jnp.float32), jnp.zeros((), jnp.float32)),
                              (jnp.arange(n), jnp.asarray(hits)))
    loss, _ = objective(x)
    return loss + kl_weight * kl


# ----------------------------------------------------------------------------------------------- the train step
def make_rlhf_step(
    apply: Callable,
    reward_apply: Callable,
    vae_graphdef,
    tx,
    rcfg: RLHFSection,
    latent_shape: tuple[int, ...],
    *,
    ref_apply: Callable | None = None,
    lr_fn: Callable | None = None,
):
    """The pure RLHF train step ``(state, batch, aux) -> (state, metrics)``, to be jitted.

    Args:
      apply: ``apply(params, latents, timestep, context, pooled) -> velocity``.
      reward_apply: ``reward_apply(reward_state, frames (B, H, W, 3) in [0, 1], input_ids) -> (B,)`` float32
        (:func:`make_reward_apply` of a ``contentv_jax.models.reward`` model).
      vae_graphdef: ``nnx.split(vae)[0]`` of the Wan VAE.
      tx: the optax optimizer (gradient clipping included).
      rcfg: the RLHF settings.
      latent_shape: ``(B, T, h, w, C)`` of the rollout latents (global batch).
      ref_apply: the frozen reference's apply (needed when ``rcfg.kl_weight > 0``).
    ``state``: ``{"step": int32 (), "rng": uint32 key data, "params": float32 pytree, "opt_state": optax
    state}``. ``batch``: ``context``, ``pooled``, ``negative_context``, ``negative_pooled`` (B, ...) and
    ``input_ids`` (B, L) the reward's prompt token ids (absent for rewards that ignore text). ``aux``: ``{"vae": VAE state, "reward": reward state,
    "ref": reference params or None}``. Noise, chosen steps and the scored frame come from
    ``fold_in(key(seed), step)``. A non-finite reward, loss or gradient norm leaves params and optimizer
    unchanged (``metrics["finite"]`` is False; the step counter advances).
    """
    from flax import nnx

    from contentv_jax.train.optim import global_norm, update_if_finite

    validate_rlhf(rcfg)
    sigmas_np = flow.sampling_sigmas(rcfg.num_steps, rcfg.shift)
    chain = rcfg.mode == "chain"

    def step_fn(state, batch, aux):
        step = state["step"]
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), step)
        k_noise, k_steps, k_frame = jax.random.split(key, 3)
        x0 = jax.random.normal(k_noise, latent_shape, jnp.float32)
        chosen = choose_steps(k_steps, rcfg.num_steps, rcfg.k, rcfg.mode)
        if rcfg.reward_frame == -1:
            frame = jax.random.randint(k_frame, (), 0, rcfg.num_frames)
        else:
            frame = int(rcfg.reward_frame)
        vae = nnx.merge(vae_graphdef, aux["vae"])
        cond = {k: batch[k] for k in ("context", "pooled", "negative_context", "negative_pooled") if k in batch}

        def objective(x_n):
            frames = decode_frame(vae, x_n, frame)
            r = reward_apply(aux["reward"], frames, batch.get("input_ids")).astype(jnp.float32)
            return jnp.mean(reward_loss(r, rcfg.reward_scale, rcfg.reward_max)), r

        grads, loss, r, kl = rlhf_gradient(
            apply, state["params"], x0, jnp.asarray(sigmas_np), cond, chosen, objective,
            guidance_scale=rcfg.guidance_scale, chain=chain, kl_weight=rcfg.kl_weight,
            ref_apply=ref_apply, ref_params=aux.get("ref"),
        )
        grad_norm = global_norm(grads)
        finite = jnp.all(jnp.isfinite(r)) & jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new_state = dict(state)
        new_state["params"], new_state["opt_state"] = update_if_finite(
            tx, grads, state["opt_state"], state["params"], finite)
        new_state["step"] = step + 1
        metrics = {
            "loss": loss,
            "reward_mean": jnp.mean(r),
            "reward_std": jnp.std(r),
            "reward_min": jnp.min(r),
            "reward_max": jnp.max(r),
            "grad_norm": grad_norm,
            "kl": kl,
            "finite": finite,
            "chosen_steps": chosen,
            "reward_frame": jnp.asarray(frame, jnp.int32),
        }
        if lr_fn is not None:
            metrics["lr"] = lr_fn(step)
        return new_state, metrics

    return step_fn


def make_apply(graphdef, params_template, rest, dtype) -> Callable:
    """``apply(params, latents, timestep, context, pooled) -> velocity`` for an MM-DiT split into ``graphdef``,
    its ``nnx.Param`` state template and the rest; ``params`` is a pure dict (float32 master weights); the model
    computes in ``dtype``."""
    from flax import nnx

    def apply(params, latents, timestep, context, pooled):
        state = jax.tree.map(lambda v: v, params_template)
        nnx.replace_by_pure_dict(state, params)
        model = nnx.merge(graphdef, state, rest)
        return model(latents.astype(dtype), timestep, context.astype(dtype), pooled.astype(dtype))

    return apply


def make_reward_apply(reward_graphdef) -> Callable:
    """``reward_apply(reward_state, frames, input_ids) -> (B,)`` float32 for a reward model split by ``nnx.split``
    (the interface of ``contentv_jax.models.reward``: frames ``(B, H, W, 3)`` in [0, 1])."""
    from flax import nnx

    def reward_apply(state, frames, input_ids):
        return nnx.merge(reward_graphdef, state)(frames, input_ids).astype(jnp.float32)

    return reward_apply
