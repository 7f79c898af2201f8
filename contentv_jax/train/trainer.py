"""The ContentV trainer: flow matching on encoded latents, one jitted train step under the device mesh.

``train(cfg)`` runs a whole job: prepares the run directory (the resolved config next to the
checkpoints), the text encoders and VAE (tiny random ones saved and reloaded through the real loading
code when no path is given), the dataset (synthetic when no ``data.dir``), the encode stage (cached),
then trains with Orbax checkpointing, automatic resume, TensorBoard / ``metrics.jsonl`` logging.

The step (ContentV report (arXiv 2506.05343), section 5.1; diffusers' SD3 training recipe):
``sigma = shift(sigmoid(N(m, s^2)))``, ``x_sigma = (1 - sigma) x0 + sigma noise``, loss
``mean((v_theta(x_sigma, 1000 sigma, text) - (noise - x0))^2)``, caption dropout to the empty prompt,
AdamW with warmup and global-norm clipping on float32 master weights, compute in ``model.dtype``.
Noise, sigma and dropout draws come from ``fold_in(key(seed), step)`` as global arrays, so every
sequence shard sees the same draws and a resumed run repeats them exactly.

Multi-host (``--coordinator/--num-processes/--process-id``): every process plans the same global batch
per step and loads only the rows its devices hold (:meth:`Trainer.host_rows`), so the losses do not
depend on the process count. Process 0 alone builds the tiny encoders and VAE, encodes the data
(``contentv_jax.data.prepare``), writes the config, logs, summary and exported config; the others wait
at the same points (``sharding.distributed.run_on_main_then_all``: a failure on process 0 stops them).
Checkpoints are written by all processes through Orbax.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from contentv_jax import checkpoints, runs
from contentv_jax.atomic import atomic_file
from contentv_jax.config import ConfigError, to_dict
from contentv_jax.data.prepare import cache_dir as data_cache_dir
from contentv_jax.dtypes import DTYPES
from contentv_jax.data.prepare import prepare as prepare_data
from contentv_jax.scheduler import sample_training_sigmas
from contentv_jax.models.flops import train_step_flops
from contentv_jax.sharding.distributed import barrier as distributed_barrier
from contentv_jax.sharding.distributed import global_batch, is_main_process, local_batch_slice, run_on_main_then_all
from contentv_jax.sharding.init import create_sharded, state_shardings
from contentv_jax.sharding.logical import activation_sharding, batch_spec
from contentv_jax.sharding.mesh import create_mesh
from contentv_jax.train import loss as fm
from contentv_jax.train import sft
from contentv_jax.train.checkpoint import TrainCheckpointer
from contentv_jax.train.config import (
    PATCH_SIZE,
    TrainConfig,
    validate,
)
from contentv_jax.train.metrics import MetricsLogger, ProgressBar
from contentv_jax.train.optim import (
    applied_updates,
    ema_decay,
    ema_update,
    global_norm,
    learning_rate_schedule,
    make_optimizer,
    update_if_finite,
    where_finite,
)


# ----------------------------------------------------------------------------- helpers


@dataclasses.dataclass
class TrainState:
    """What :meth:`Trainer._init_state` builds: the model's ``graphdef``, its non-parameter state
    ``rest`` (replicated), the parameters' abstract ``template`` (``nnx.State`` of ShapeDtypeStructs),
    the step's ``state`` dict (``step``, ``rng``, ``params``, ``opt_state``, ``ema``) and its ``shardings``."""

    graphdef: Any
    rest: Any
    template: Any
    state: dict
    shardings: dict


def latent_tokens(latents_shape) -> int:
    """Video tokens of a (B, T, H, W, C) latent batch after the 1x2x2 patchify."""
    b, t, h, w, _ = latents_shape
    return b * t * (h // PATCH_SIZE) * (w // PATCH_SIZE)


def _atomic_write(path: Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)


# ----------------------------------------------------------------------------- the step


def make_train_step(graphdef, params_template, rest, tx, cfg: TrainConfig, empty_context, empty_pooled):
    """The pure train step ``(state, batch, ref_params) -> (state, metrics)``.

    ``state``: ``{"step": int32 (), "rng": uint32 key data, "params": pure dict (float32),
    "opt_state": optax state, "ema": pure dict or None}``; ``batch``: ``latents`` (B, T, H, W, C),
    ``prompt_embeds`` (B, L, Dctx), ``pooled`` (B, Dpool). ``ref_params``: the frozen reference model's
    pure dict (bfloat16) when ``sft.kl_weight > 0`` (the SFT regulariser, :mod:`contentv_jax.train.sft`),
    else None; it is an input only (no gradient, never updated). A non-finite loss or gradient norm leaves
    params, optimizer and EMA unchanged (the step counter still advances past the batch).
    The logged ``lr`` is the rate this step's update used: optax's schedule at its own count of
    applied updates (which skipped steps do not advance). The EMA decay warms up as diffusers'
    ``EMAModel.get_decay`` over the same count (:func:`contentv_jax.train.optim.ema_decay`).
    """
    dtype = DTYPES[cfg.model.dtype]
    sched = cfg.schedule
    lr_fn = learning_rate_schedule(cfg.optimizer)
    max_ema_decay = cfg.optimizer.ema_decay
    kl_weight = float(cfg.sft.kl_weight)

    def velocity_of(params, x_sigma, t, context, pooled):
        state = jax.tree.map(lambda v: v, params_template)
        nnx.replace_by_pure_dict(state, params)  # float32 master weights; the model computes in its dtype
        model = nnx.merge(graphdef, state, rest)
        return model(x_sigma.astype(dtype), t, context.astype(dtype), pooled.astype(dtype))

    def loss_fn(params, x_sigma, t, context, pooled, target, ref_params):
        velocity = velocity_of(params, x_sigma, t, context, pooled)
        if kl_weight == 0:
            loss = fm.velocity_mse(velocity, target)
            return loss, {}
        v_ref = jax.lax.stop_gradient(velocity_of(ref_params, x_sigma, t, context, pooled))
        return sft.regularised_loss(velocity, target, v_ref, kl_weight)

    def step_fn(state, batch, ref_params=None):
        step = state["step"]
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), step)
        k_noise, k_sigma, k_drop = jax.random.split(key, 3)
        latents = batch["latents"].astype(jnp.float32)
        b = latents.shape[0]
        noise = jax.random.normal(k_noise, latents.shape, jnp.float32)
        sigma = sample_training_sigmas(
            k_sigma, b, logit_mean=sched.logit_mean, logit_std=sched.logit_std, shift=sched.flow_shift
        )
        context, pooled = fm.caption_dropout(
            k_drop, batch["prompt_embeds"], batch["pooled"], empty_context, empty_pooled, cfg.data.caption_dropout
        )
        x_sigma, target = fm.noisy_latents(latents, noise, sigma)
        (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"], x_sigma, fm.timesteps(sigma), context, pooled, target, ref_params
        )
        grad_norm = global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        prior_updates = applied_updates(state["opt_state"])
        new_state = dict(state)
        new_state["params"], new_state["opt_state"] = update_if_finite(
            tx, grads, state["opt_state"], state["params"], finite)
        if state.get("ema") is not None:
            decay = ema_decay(max_ema_decay, prior_updates)
            new_state["ema"] = where_finite(finite, ema_update(state["ema"], new_state["params"], decay), state["ema"])
        new_state["step"] = step + 1
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": lr_fn(prior_updates),
            "sigma_mean": jnp.mean(sigma),
            "finite": finite,
            **parts,
        }
        return new_state, metrics

    return step_fn


# ----------------------------------------------------------------------------- setup


class Trainer:
    """One training job. ``Trainer(cfg).run()``; ``devices`` restricts the mesh (default: all devices)."""

    def __init__(self, cfg: TrainConfig, *, devices=None):
        self.cfg = validate(cfg)
        self.run_dir = Path(cfg.run_dir).absolute()
        self.main = is_main_process()
        self.devices = list(devices) if devices is not None else jax.devices()
        try:
            self.mesh = create_mesh(cfg.mesh, self.devices)
        except ValueError as e:
            raise ConfigError(f"config key 'mesh': {e}") from None
        self.rules = cfg.mesh.logical_rules()
        self.batch_spec = batch_spec(self.rules)  # batch rows as the rules place activation_batch
        shard = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        self.batch_multiple = math.lcm(shard, jax.process_count())
        b = cfg.buckets
        for key, v, on in (("buckets.batch_video", b.batch_video, b.videos), ("buckets.batch_image", b.batch_image, b.images)):
            if on and v % self.batch_multiple and cfg.mode != "rlhf":  # rlhf: rlhf.batch, checked by RLHFTrainer
                raise ConfigError(
                    f"config key {key!r}: batch {v} is not divisible by the mesh's data x fsdp = {shard} "
                    f"(and {jax.process_count()} processes)"
                )
        for key, path in (("data.dir", cfg.data.dir), ("vae.path", cfg.vae.path), ("text.path", cfg.text.path)):
            if path and not Path(path).is_dir():
                raise ConfigError(f"config key {key!r}: {path!r} is not a directory")
        if cfg.data.dir and not (Path(cfg.data.dir) / "captions.jsonl").is_file():
            raise ConfigError(f"config key 'data.dir': {cfg.data.dir!r} has no captions.jsonl (video files + captions.jsonl expected)")
        if not cfg.vae.path:  # the tiny VAE's config name, checked before anything is built
            from contentv_jax.models.vae import get_config as vae_config

            try:
                vae_config(cfg.vae.name)
            except ValueError as e:
                raise ConfigError(f"config key 'vae.name': {e}") from None
        self.model_config, self.model_source = self._model_config()
        try:  # the kernel the model will run, checked for this backend before anything compiles
            self.attention_kernel = self.model_config.resolved_attention_kernel()
        except ValueError as e:
            raise ConfigError(f"config key 'model.attention_kernel': {e}") from None
        self.cache_dir = data_cache_dir(cfg)
        self.encode_stats: dict = {}

    # -- assets
    def _write_config(self) -> None:
        """``config.yaml`` (the resolved config) and ``model_config.json`` (the transformer's config, which
        sampling an intermediate checkpoint needs: ``contentv_jax.runs``)."""
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            _atomic_write(self.run_dir / runs.CONFIG_YAML, yaml.safe_dump(to_dict(self.cfg), sort_keys=False))
            _atomic_write(self.run_dir / runs.MODEL_CONFIG, json.dumps(self.model_config.to_dict(), indent=2, sort_keys=True) + "\n")

    def _model_config(self):
        """The TransformerConfig to train: named (random init) or the checkpoint's, with our dtype and remat."""
        return checkpoints.transformer_config(self.cfg.model)

    def _build_model(self, mc, source):
        """The model with its parameters in their shardings on the mesh (float32 master weights)."""
        from contentv_jax.models import transformer as T

        seed = self.cfg.seed
        if source == "random":
            return create_sharded(lambda: T.MMDiT(mc, rngs=nnx.Rngs(seed)), self.mesh, self.rules)
        if source == "ours":
            return checkpoints.load_sharded(self.cfg.model.init, lambda: T.MMDiT(mc, rngs=nnx.Rngs(0)), self.mesh, self.rules)
        model = checkpoints.load_transformer(
            self.cfg.model.init, dtype=mc.dtype, param_dtype="float32", remat_policy=mc.remat_policy,
            attention_kernel=mc.attention_kernel,
        )
        graphdef, state = nnx.split(model)
        sh = state_shardings(state, self.mesh, self.rules)
        state = jax.tree.map(lambda x, s: jax.device_put(x, s), state, sh)
        return nnx.merge(graphdef, state)

    # -- state
    def _init_state(self, tx) -> TrainState:
        """The model built into its shardings, split into the pure float32 parameters the step updates
        and the rest; the optimizer state sharded like the parameters it tracks (``optax.tree_map_params``)."""
        model = self._build_model(self.model_config, self.model_source)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
        pure = nnx.to_pure_dict(params)
        if any(x.dtype != jnp.float32 for x in jax.tree.leaves(pure)):
            raise ValueError("master weights must be float32 (model param_dtype)")
        p_sh = nnx.to_pure_dict(state_shardings(params, self.mesh, self.rules))
        repl = NamedSharding(self.mesh, PartitionSpec())
        opt_sh = optax.tree_map_params(tx, lambda _, sh: sh, jax.eval_shape(tx.init, pure), p_sh,
                                       transform_non_params=lambda _: repl)
        with jax.set_mesh(self.mesh):
            opt_state = jax.jit(tx.init, out_shardings=opt_sh)(pure)
        ema = self.cfg.optimizer.ema_decay > 0
        distributed_barrier("init_state")  # the replicated device_puts below check equality with a collective
        state = {
            "step": jax.device_put(jnp.zeros((), jnp.int32), repl),
            "rng": jax.device_put(jax.random.key_data(jax.random.key(self.cfg.seed)), repl),
            "params": pure,
            "opt_state": opt_state,
            "ema": jax.tree.map(jnp.copy, pure) if ema else None,
        }
        # SFT: the frozen reference = the run's initial weights (model.init) in bfloat16, sharded like the
        # trained params; outside the train state, so never in the optimizer, never updated, never saved
        self.ref_params = None
        if self.cfg.sft.kl_weight > 0:
            with jax.set_mesh(self.mesh):
                self.ref_params = jax.jit(
                    lambda p: jax.tree.map(lambda x: x.astype(jnp.bfloat16), p), out_shardings=p_sh
                )(pure)
            self.ref_sh = p_sh
        shardings = {"step": repl, "rng": repl, "params": p_sh, "opt_state": opt_sh, "ema": p_sh if ema else None}
        return TrainState(graphdef, jax.device_put(rest, repl), template, state, shardings)

    def _batch_sharding(self):
        sh = NamedSharding(self.mesh, self.batch_spec)
        return {"latents": sh, "prompt_embeds": sh, "pooled": sh}

    def host_rows(self, global_batch_size: int) -> slice:
        """The rows of a global batch this process's devices hold (and so the rows its data loader reads)."""
        return local_batch_slice(global_batch_size, self.mesh, self.batch_spec)

    def prepare(self):
        """Write the resolved config; then ``contentv_jax.data.prepare``: unless the encoded cache is complete
        and matches, build or load the text encoders and VAE, render the synthetic dataset (no
        ``data.dir``) and encode. Returns ``(model_config, source, encoded_dir)``."""
        self._write_config()
        prepared = prepare_data(self.cfg, self.model_config)
        self.encode_stats = prepared.stats
        return self.model_config, self.model_source, prepared.encoded

    def _batches(self, encoded):
        from contentv_jax.data.loader import TrainBatches

        b = self.cfg.buckets
        kinds = "both" if (b.images and b.videos) else ("image" if b.images else "video")
        return TrainBatches(
            encoded,
            seed=self.cfg.seed,
            video_batch_size=b.batch_video if b.videos else (b.batch_image or 1),
            image_batch_size=b.batch_image if b.images else None,
            batch_multiple=self.batch_multiple,
            host_rows=self.host_rows,
            image_fraction=b.image_fraction if kinds == "both" else None,
            kinds=kinds,
            num_threads=self.cfg.data.num_threads,
            caption_weights=self.cfg.data.caption_weights,
            record_filter=self.cfg.data.filter,
        )

    def setup(self):
        """Everything before the first step: :meth:`prepare`, model, optimizer, compiled step, resume."""
        cfg = self.cfg
        model_config, source, encoded = self.prepare()
        self.data_iter = self._batches(encoded)
        empty_ctx, empty_pooled = self.data_iter.null_text()
        self.tx = make_optimizer(cfg.optimizer)
        init = self._init_state(self.tx)
        self.graphdef, self.rest, self.template = init.graphdef, init.rest, init.template
        self.state, self.state_sh = init.state, init.shardings
        repl = NamedSharding(self.mesh, PartitionSpec())
        step_fn = make_train_step(
            self.graphdef, self.template, self.rest, self.tx, cfg, jax.device_put(jnp.asarray(empty_ctx[0]), repl),
            jax.device_put(jnp.asarray(empty_pooled[0]), repl),
        )
        self.batch_sh = self._batch_sharding()
        ref_sh = self.ref_sh if self.ref_params is not None else None
        self._step = jax.jit(
            step_fn,
            in_shardings=(self.state_sh, self.batch_sh, ref_sh),
            out_shardings=(self.state_sh, None),
            donate_argnums=(0,),
        )
        self.ckpt = TrainCheckpointer(
            self.run_dir / "checkpoints", every=cfg.checkpoint.every, keep=cfg.checkpoint.keep,
            async_save=cfg.checkpoint.async_save,
        )
        self.start_step = 0
        self.resume_skipped: list[dict] = []
        if cfg.checkpoint.resume:
            self._resume()
        self.preview = self._preview()
        return self

    def _resume(self) -> None:
        """Restore the newest intact checkpoint of the run dir (each verified against its manifest
        unless ``checkpoint.verify`` is false). A damaged newer one is skipped with a warning naming
        its step and why (also logged to ``metrics.jsonl`` when the run starts); when every checkpoint
        is damaged, CheckpointError lists them (never a silent fresh start)."""
        import sys

        for step in sorted(self.ckpt.all_steps(), reverse=True):
            try:
                state, data_state = self.ckpt.restore(step, self.state, verify=self.cfg.checkpoint.verify)
            except Exception as e:  # noqa: BLE001 - a damaged checkpoint of any kind: try the previous one
                reason = " ".join(str(e).split())[:400] or type(e).__name__
                self.resume_skipped.append({"step": step, "reason": reason})
                continue
            self.state, self.start_step = state, step
            self.data_iter.set_state(data_state)
            if self.resume_skipped and self.main:
                skipped = "; ".join(f"step {d['step']}: {d['reason']}" for d in self.resume_skipped)
                print(f"warning: resumed from step {step}, the newest intact checkpoint in {self.ckpt.directory}; "
                      f"skipped damaged {skipped}", file=sys.stderr, flush=True)
            return
        if self.resume_skipped:
            raise checkpoints.CheckpointError(
                f"no intact checkpoint in {self.ckpt.directory}: "
                + "; ".join(f"step {d['step']}: {d['reason']}" for d in self.resume_skipped)
            )

    def export_model(self) -> nnx.Module:
        """The model with the weights the run exports (the EMA when enabled, else the parameters), as sharded."""
        weights = self.state["ema"] if self.state.get("ema") is not None else self.state["params"]
        state = jax.tree.map(lambda v: v, self.template)
        nnx.replace_by_pure_dict(state, weights)
        return nnx.merge(self.graphdef, state, self.rest)

    def export(self, dst: Path) -> None:
        """Write the trained weights (the EMA when enabled) as a transformer checkpoint loadable by
        ``load_transformer`` (``contentv_jax.checkpoints.export_checkpoint``: every process writes its shards).

        ``config.json`` records which weights these are: ``_exported_weights`` (``"ema"`` or
        ``"params"``), and for the EMA ``_ema`` (the configured decay, the number of updates it
        averaged, the warm-up rule); the keys start with ``_``, so loaders ignore them."""
        use_ema = self.state.get("ema") is not None
        record = {"_exported_weights": "ema" if use_ema else "params"}
        if use_ema:
            record["_ema"] = {
                "decay": self.cfg.optimizer.ema_decay,
                "updates": int(np.asarray(applied_updates(self.state["opt_state"]).addressable_data(0))),
                "warmup": "min(decay, (1 + step) / (10 + step)), 0 at the first update (diffusers EMAModel.get_decay)",
            }
        checkpoints.export_checkpoint(dst, nnx.state(self.export_model()), {**self.model_config.to_dict(), **record})

    def _asset_dirs(self) -> tuple[Path, Path]:
        """The VAE and text-encoder directories of the run (``vae.path`` / ``text.path`` or the tiny ones under
        ``assets/``, built on process 0 if a reused encode cache left them unbuilt)."""
        from contentv_jax.data import prepare as assets

        cfg = self.cfg
        vae_dir = Path(cfg.vae.path) if cfg.vae.path else self.run_dir / runs.ASSETS / "vae"
        text_dir = Path(cfg.text.path) if cfg.text.path else self.run_dir / runs.ASSETS / "text"

        def build():
            if not vae_dir.is_dir():
                assets.tiny_vae(cfg)
            if not text_dir.is_dir():
                assets.text_encoders(cfg, self.model_config)

        run_on_main_then_all("assets", build if self.main else None)
        return vae_dir, text_dir

    def write_pipeline(self) -> Path:
        """``<run_dir>/pipeline``: the exported transformer, the run's VAE, text encoders and tokenizers and
        the sampling shift as one diffusers-layout ContentV directory (``contentv_jax.train.export``); written
        by process 0 while the others wait."""
        from contentv_jax.train.export import write_pipeline_dir

        vae_dir, text_dir = self._asset_dirs()
        dst = self.run_dir / runs.PIPELINE

        def write():
            write_pipeline_dir(dst, transformer=self.run_dir / runs.EXPORT, vae=vae_dir, text=text_dir,
                               shift=self.cfg.sampling.shift, run_dir=self.run_dir)

        run_on_main_then_all("pipeline", write if self.main else None)
        return dst

    def _preview(self):
        """The :class:`contentv_jax.train.preview.PreviewSampler` of ``logging.sample_every``; None when off or
        when no step of this run (after ``start_step``, up to ``steps``) is a multiple of it, so a short run or
        a resumed tail neither loads the text encoders and VAE nor compiles the sampler for nothing."""
        every = self.cfg.logging.sample_every
        if not every or self.cfg.steps // every <= self.start_step // every:
            return None
        from contentv_jax.checkpoints import load_vae
        from contentv_jax.text import TextEncoders
        from contentv_jax.train.preview import PreviewSampler

        vae_dir, text_dir = self._asset_dirs()
        return PreviewSampler(
            self.cfg, TextEncoders.from_pretrained(text_dir), load_vae(vae_dir) if self.main else None,
            latent_channels=self.model_config.in_channels, mesh=self.mesh, run_dir=self.run_dir, main=self.main,
        )

    def global_batch(self, local: dict) -> dict:
        """This process's rows (:meth:`host_rows`; e.g. ``data_iter``'s batch) -> global jax arrays
        sharded over (data, fsdp). With one process ``local`` is the whole batch."""
        rows = local.get("global_batch_size")
        arrays = {k: np.asarray(local[k]) for k in ("latents", "prompt_embeds", "pooled")}
        return global_batch(arrays, self.mesh, self.batch_spec, global_batch_size=rows)

    def train_step(self, batch: dict):
        """Run one compiled step on a global batch; returns host metrics (a dict of floats)."""
        return self._read_metrics(self._dispatch(batch))

    def _dispatch(self, batch: dict):
        """Start one compiled step; returns its metrics as device arrays, without waiting for them."""
        with jax.set_mesh(self.mesh), activation_sharding(self.mesh, self.rules):
            step = self._step
            if jax.process_count() > 1:  # compile ahead, then meet: the first collective's set-up waits 30 s at most
                shapes = tuple((x.shape, str(x.dtype)) for x in jax.tree.leaves(batch))
                compiled = self.__dict__.setdefault("_compiled_steps", {})
                if shapes not in compiled:
                    compiled[shapes] = self._step.lower(self.state, batch, self.ref_params).compile()
                    distributed_barrier(f"train_step_{len(compiled)}")
                step = compiled[shapes]
            self.state, metrics = step(self.state, batch, self.ref_params)
        return metrics

    @staticmethod
    def _read_metrics(metrics) -> dict:
        """Device metrics -> host floats (blocks until that step has run). The metrics are replicated,
        so each process reads its own copy (no cross-host transfer)."""
        return {k: float(np.asarray(v.addressable_data(0))) for k, v in metrics.items()}

    def _stop_check(self):
        """How this run learns of a SIGTERM, and ``(check(step) -> bool, restore)``.

        Every process must stop at the same step, or the one that stops enters the collective
        checkpoint save while the others are inside a collective train step: a hang. With the JAX
        distributed runtime and its preemption service (on by default), JAX's own notifier catches
        SIGTERM on any host and ``multihost_utils.reached_preemption_sync_point(step)`` turns true at
        the same step on every host; no Python handler is installed (it would replace JAX's). With the
        runtime but no preemption service, a local flag is all-reduced every step (a max over
        processes). One process: a local flag, set by a SIGTERM handler (the previous handler restored
        by ``restore``)."""
        from jax.experimental import multihost_utils

        if jax.distributed.is_initialized() and jax.config.jax_enable_preemption_service:
            return multihost_utils.reached_preemption_sync_point, lambda: None
        flag = {"sigterm": False}
        prev = signal.getsignal(signal.SIGTERM)
        try:
            signal.signal(signal.SIGTERM, lambda *_: flag.__setitem__("sigterm", True))
            restore = lambda: signal.signal(signal.SIGTERM, prev)  # noqa: E731
        except ValueError:  # not the main thread
            restore = lambda: None  # noqa: E731
        if jax.process_count() > 1:
            def check(step):
                return bool(np.max(multihost_utils.process_allgather(np.int32(flag["sigterm"]))))

            return check, restore
        return (lambda step: flag["sigterm"]), restore

    # -- the loop
    def run(self) -> dict:
        """Train until ``cfg.steps``; returns a summary (``final_step``, ``losses``, ``skipped_files``, ...).

        The host never waits for the step it just dispatched, and reads metrics only when it logs:
        the device metrics of each step are kept, and all steps up to a logging step N (``step %
        logging.every == 0``, and the last step) are read in one go after step N + 1 is dispatched
        (MaxText's one-step-behind pattern), so between logging steps the host prepares and dispatches
        batches without a device-to-host transfer. Before a checkpoint is saved every dispatched step
        is read (a checkpoint's step is logged before it is committed). A non-finite update is skipped
        on the device at once (:func:`contentv_jax.train.optim.update_if_finite`); the stop at
        ``max_nonfinite`` non-finite steps takes effect when they are read, at the next logging step
        or checkpoint. A SIGTERM (on any host) stops every process at
        the same step (:meth:`_stop_check`), after one collective checkpoint save; exit status 0.
        """
        cfg = self.cfg
        if not hasattr(self, "_step"):
            self.setup()
        logger = MetricsLogger(self.run_dir, enabled=self.main, tensorboard=cfg.logging.tensorboard)
        bar = ProgressBar(cfg.steps, self.start_step, enabled=self.main and cfg.logging.progress_bar)
        stop_requested, restore_handler = self._stop_check()
        hook = _test_sigterm_step()
        for d in getattr(self, "resume_skipped", []):
            logger.event(self.start_step, event="damaged_checkpoint_skipped", damaged_step=d["step"], reason=d["reason"],
                         resumed_from=self.start_step)
        step = self.start_step
        last_saved = self.start_step if self.start_step in self.ckpt.all_steps() else None
        counts = {"nonfinite": 0}
        losses = []
        status = "completed"
        clock = {"t": time.perf_counter(), "n": 0}

        def record(done_step, m, tokens, flops):
            """Log one finished step's host metrics; False when too many steps were non-finite."""
            losses.append(m["loss"])
            clock["n"] += 1
            ok = True
            if not m.pop("finite"):
                counts["nonfinite"] += 1
                logger.event(done_step, event="nonfinite_loss", loss=str(m["loss"]), grad_norm=str(m["grad_norm"]),
                             count=counts["nonfinite"])
                bar.write(f"step {done_step}: non-finite loss {m['loss']} (grad norm {m['grad_norm']}); update skipped")
                ok = counts["nonfinite"] < cfg.max_nonfinite
            if done_step % cfg.logging.every == 0 or done_step == cfg.steps:
                now = time.perf_counter()
                sps = clock["n"] / max(now - clock["t"], 1e-9)
                clock["t"], clock["n"] = now, 0
                m.update(steps_per_s=sps, tokens_per_s=sps * tokens,
                         model_tflops_per_device=sps * flops / self.mesh.devices.size / 1e12)
                logger.log(done_step, m)
            bar.update(1, loss=m["loss"], **{"steps/s": m.get("steps_per_s", 0.0), "tok/s": m.get("tokens_per_s", 0.0)})
            return ok

        def logs(done_step):
            return done_step % cfg.logging.every == 0 or done_step == cfg.steps

        pending = []  # (step, device metrics, tokens, flops) of dispatched steps whose metrics are not read yet

        def read(upto):
            """Read and record every pending step <= ``upto`` (the first read waits for those steps; the
            rest are done by then); False when too many were non-finite."""
            ready = [p for p in pending if p[0] <= upto]
            del pending[:len(ready)]
            ok = True
            for done_step, metrics, tokens, flops in ready:
                ok = record(done_step, self._read_metrics(metrics), tokens, flops) and ok
            return ok

        try:
            while step < cfg.steps:
                local = next(self.data_iter)
                if int(local.get("step", step)) != step:
                    raise RuntimeError(f"data iterator is at step {local['step']}, the trainer at {step}")
                batch = self.global_batch(local)
                metrics = self._dispatch(batch)
                step += 1
                ok = read(step - 1) if any(logs(p[0]) for p in pending) else True  # one step behind
                pending.append((step, metrics, latent_tokens(batch["latents"].shape),
                                train_step_flops(self.model_config, batch["latents"].shape, batch["prompt_embeds"].shape[1])))
                if ok and self.ckpt.on_interval(step):  # a checkpoint's step is logged before it is committed
                    ok = read(step)
                if not ok:
                    status = f"stopped: {counts['nonfinite']} non-finite losses (max_nonfinite={cfg.max_nonfinite})"
                    break
                saved = self.ckpt.save(step, self.state, self.data_iter.get_state())
                if saved:
                    last_saved = step
                if self.preview is not None and self.preview.due(step):
                    self.preview(step, self.export_model(), logger)
                    clock["t"] = time.perf_counter()  # sampling time is not training time
                _test_signal_after_step(step, saved, self.ckpt)  # test-only; a no-op unless its env var is set
                if hook is not None and step == hook:
                    os.kill(os.getpid(), signal.SIGTERM)
                if stop_requested(step):
                    status = "interrupted by SIGTERM (checkpoint saved)"
                    break
            if not read(step) and status == "completed":
                status = f"stopped: {counts['nonfinite']} non-finite losses (max_nonfinite={cfg.max_nonfinite})"
            if last_saved != step:
                self.ckpt.save(step, self.state, self.data_iter.get_state(), force=True)
            self.ckpt.wait()
            if cfg.checkpoint.export and status == "completed":
                self.export(self.run_dir / runs.EXPORT)
                self.write_pipeline()
        finally:
            self.ckpt.close()
            bar.close()
            logger.flush()
            logger.close()
            restore_handler()
        nonfinite = counts["nonfinite"]
        skipped = [
            {"file": f, "reason": reason} for reason, files in self.encode_stats.get("skipped", {}).items() for f in files
        ]
        summary = {
            "status": status,
            "start_step": self.start_step,
            "final_step": step,
            "losses": losses,
            "nonfinite": nonfinite,
            "records": self.encode_stats.get("records"),
            "skipped_files": skipped,
            "run_dir": str(self.run_dir),
        }
        if cfg.sft.kl_weight > 0:  # the frozen reference is not saved with the checkpoints: where it came from
            summary["sft_reference"] = {"path": str(Path(cfg.model.init).absolute()), "kl_weight": cfg.sft.kl_weight}
        if self.main:
            _atomic_write(self.run_dir / "summary.json", json.dumps({k: v for k, v in summary.items() if k != "losses"}, indent=1))
        return summary


# --- test-only hook (tests/test_train.py): kill or interrupt the run at a known step, independent of timing.
TEST_SIGNAL_ENV = "CONTENTV_TEST_SIGNAL_AFTER_STEP"


def _test_signal_after_step(step: int, saved: bool, ckpt) -> None:
    """With ``CONTENTV_TEST_SIGNAL_AFTER_STEP=STEP:SIGNAL`` (e.g. ``10:SIGKILL``), after step STEP (and the
    commit of its checkpoint, if one was saved at STEP) this process sends itself SIGNAL. Unset: nothing."""
    spec = os.environ.get(TEST_SIGNAL_ENV)
    if not spec:
        return
    at, _, name = spec.partition(":")
    if int(at) == step:
        if saved:
            ckpt.wait()
        os.kill(os.getpid(), getattr(signal, name))
# --- end of the test-only hook


TEST_SIGTERM_ENV = "CONTENTV_TEST_SIGTERM_AT_STEP"


def _test_sigterm_step() -> int | None:
    """Test hook: ``CONTENTV_TEST_SIGTERM_AT_STEP=N`` (or ``N:I``, process ``I`` only) makes the process
    send itself SIGTERM right after dispatching step N, so tests can preempt at a known step without
    racing the run. Unset in real runs."""
    v = os.environ.get(TEST_SIGTERM_ENV)
    if not v:
        return None
    at, _, proc = v.partition(":")
    if proc and int(proc) != jax.process_index():
        return None
    return int(at)


def train(cfg: TrainConfig, *, devices=None) -> dict:
    """Run a training job (see module docstring); returns the summary dict."""
    return Trainer(cfg, devices=devices).setup().run()
