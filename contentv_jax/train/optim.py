"""The optimizer: optax AdamW with linear warmup, constant or cosine decay, global-norm clipping; EMA.

Mirrors the report's recipe (AdamW, warmup, gradient clipping; section 5) in optax terms.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

# ``cfg`` below is the config's ``optimizer`` section (``contentv_jax.train.config.OptimizerSection``), not imported:
# train.config imports the training modes (train.rlhf), which use the helpers of this module.


def learning_rate_schedule(cfg) -> optax.Schedule:
    """Linear warmup from 0 to ``cfg.lr`` over ``warmup_steps``, then constant or cosine decay to 0 at
    ``decay_steps``. The schedule does not depend on the run's total steps (so resumed runs agree)."""
    warmup = optax.linear_schedule(0.0, cfg.lr, max(cfg.warmup_steps, 1)) if cfg.warmup_steps else optax.constant_schedule(cfg.lr)
    if cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(cfg.lr, cfg.decay_steps - cfg.warmup_steps)
    else:
        after = optax.constant_schedule(cfg.lr)
    if not cfg.warmup_steps:
        return after
    return optax.join_schedules([warmup, after], [cfg.warmup_steps])


def make_optimizer(cfg) -> optax.GradientTransformation:
    """``clip_by_global_norm(grad_clip)`` (when > 0) followed by ``adamw`` with the schedule above."""
    parts = []
    if cfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip))
    parts.append(
        optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    )
    return optax.chain(*parts)


def where_finite(finite, new, old):
    """``new`` where ``finite`` (a scalar bool, traced), else ``old``, leaf by leaf."""
    return jax.tree.map(lambda a, o: jnp.where(finite, a, o), new, old)


def update_if_finite(tx: optax.GradientTransformation, grads, opt_state, params, finite):
    """One ``tx`` update of ``params`` (float32 master weights; ``optax.apply_updates``), kept only
    when ``finite``: a step with a non-finite loss, reward or gradient leaves the parameters and the optimizer
    state, its schedule count included, as they were. Returns ``(params, opt_state)``."""
    updates, new_opt = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    return where_finite(finite, new_params, params), where_finite(finite, new_opt, opt_state)


def ema_update(ema, params, decay):
    """``ema <- decay * ema + (1 - decay) * params`` leaf by leaf, in the EMA's dtype (float32).
    ``decay``: a float or a traced float32 scalar (:func:`ema_decay`)."""
    return jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p.astype(e.dtype)).astype(e.dtype), ema, params)


def ema_decay(max_decay: float, prior_updates) -> jax.Array:
    """The EMA decay of an update that follows ``prior_updates`` applied updates of this run.

    Mirrors diffusers' ``EMAModel.get_decay`` (``diffusers/training_utils.py``, ``use_ema_warmup=False``,
    ``update_after_step=0``, ``min_decay=0``): 0 for the run's first update (the EMA starts as the
    first updated weights), then ``min(max_decay, (1 + s) / (10 + s))`` with ``s = prior_updates``.
    So a short run (5,000 steps of VAE adaptation or SFT at 0.9999) does not export weights that are
    still mostly the initial ones. Returns a float32 scalar.
    """
    s = jnp.asarray(prior_updates, jnp.float32)
    return jnp.where(s <= 0, 0.0, jnp.minimum(jnp.float32(max_decay), (1.0 + s) / (10.0 + s)))


def applied_updates(opt_state) -> jax.Array:
    """How many updates the optimizer has applied: the count optax's learning-rate schedule reads
    (``ScaleByScheduleState.count``; steps skipped for a non-finite loss leave it unchanged)."""
    counts = [v for path, v in optax.tree_utils.tree_get_all_with_path(opt_state, "count")
              if any(getattr(k, "tuple_name", None) == "ScaleByScheduleState" for k in path)]
    if len(counts) != 1:
        raise ValueError(f"expected one optax schedule count in the optimizer state, found {len(counts)}")
    return counts[0]


def global_norm(tree) -> jax.Array:
    """The float32 global L2 norm of a pytree."""
    return optax.tree.norm(jax.tree.map(lambda x: x.astype(jnp.float32), tree))
