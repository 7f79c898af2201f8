"""The ContentV trainer: flow matching on encoded latents, one jitted train step under the device mesh.

``train(cfg)`` runs a whole job: prepares the run directory (the resolved config next to the
checkpoints), the text encoders and VAE (tiny random ones saved and reloaded through the real loading
code when no path is given), the dataset (synthetic when no ``data.dir``), the encode stage (cached),
then trains with Orbax checkpointing, automatic resume, TensorBoard / ``metrics.jsonl`` logging.

The step (report section 5, reference doc section 4; diffusers' SD3 training recipe):
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

import json
import math
import os
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from contentv_jax import checkpoints
from contentv_jax.config import ConfigError, to_dict
from contentv_jax.data.prepare import cache_dir as data_cache_dir
from contentv_jax.data.prepare import prepare as prepare_data
from contentv_jax.scheduler import sample_training_sigmas
from contentv_jax.sharding.distributed import global_batch, is_main_process, local_batch_slice
from contentv_jax.sharding.logical import activation_sharding
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
from contentv_jax.train.optim import ema_update, global_norm, learning_rate_schedule, make_optimizer

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "float16": jnp.float16}


# ----------------------------------------------------------------------------- helpers


def latent_tokens(latents_shape) -> int:
    """Video tokens of a (B, T, H, W, C) latent batch after the 1x2x2 patchify."""
    b, t, h, w, _ = latents_shape
    return b * t * (h // PATCH_SIZE) * (w // PATCH_SIZE)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- sharding


def _match_tree(opt_abstract, params_treedef, param_sh, replicated):
    """Shardings for an optax state: subtrees shaped like the params get the params' shardings."""
    if jax.tree.structure(opt_abstract) == params_treedef:
        return param_sh
    if isinstance(opt_abstract, tuple) and hasattr(opt_abstract, "_fields"):
        return type(opt_abstract)(*[_match_tree(x, params_treedef, param_sh, replicated) for x in opt_abstract])
    if isinstance(opt_abstract, (tuple, list)):
        return type(opt_abstract)(_match_tree(x, params_treedef, param_sh, replicated) for x in opt_abstract)
    if isinstance(opt_abstract, dict):
        return {k: _match_tree(v, params_treedef, param_sh, replicated) for k, v in opt_abstract.items()}
    return jax.tree.map(lambda _: replicated, opt_abstract)


# ----------------------------------------------------------------------------- the step


def make_train_step(graphdef, params_template, rest, tx, cfg: TrainConfig, empty_context, empty_pooled):
    """The pure train step ``(state, batch, ref_params) -> (state, metrics)``.

    ``state``: ``{"step": int32 (), "rng": uint32 key data, "params": pure dict (float32),
    "opt_state": optax state, "ema": pure dict or None}``; ``batch``: ``latents`` (B, T, H, W, C),
    ``prompt_embeds`` (B, L, Dctx), ``pooled`` (B, Dpool). ``ref_params``: the frozen reference model's
    pure dict (bfloat16) when ``sft.kl_weight > 0`` (the SFT regulariser, :mod:`contentv_jax.train.sft`),
    else None; it is an input only (no gradient, never updated). A non-finite loss or gradient norm
    leaves params, optimizer and EMA unchanged (the step counter still advances past the batch).
    """
    dtype = DTYPES[cfg.model.dtype]
    sched = cfg.schedule
    lr_fn = learning_rate_schedule(cfg.optimizer)
    ema_decay = cfg.optimizer.ema_decay
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
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = jax.tree.map(lambda p, u: p + u.astype(p.dtype), state["params"], updates)

        def keep(new, old):
            return jax.tree.map(lambda a, o: jnp.where(finite, a, o), new, old)

        new_state = dict(state)
        new_state["params"] = keep(params, state["params"])
        new_state["opt_state"] = keep(opt_state, state["opt_state"])
        if state.get("ema") is not None:
            new_state["ema"] = keep(ema_update(state["ema"], params, ema_decay), state["ema"])
        new_state["step"] = step + 1
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": lr_fn(step),
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
        shard = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        self.batch_multiple = math.lcm(shard, jax.process_count())
        b = cfg.buckets
        for key, v, on in (("buckets.batch_video", b.batch_video, b.videos), ("buckets.batch_image", b.batch_image, b.images)):
            if on and v % self.batch_multiple:
                raise ConfigError(
                    f"config key {key!r}: batch {v} is not divisible by the mesh's data x fsdp = {shard} "
                    f"(and {jax.process_count()} processes)"
                )
        for key, path in (("data.dir", cfg.data.dir), ("vae.path", cfg.vae.path), ("text.path", cfg.text.path)):
            if path and not Path(path).is_dir():
                raise ConfigError(f"config key {key!r}: {path!r} is not a directory")
        if cfg.data.dir and not (Path(cfg.data.dir) / "captions.jsonl").is_file():
            raise ConfigError(f"config key 'data.dir': {cfg.data.dir!r} has no captions.jsonl (video files + captions.jsonl expected)")
        self.model_config, self.model_source = self._model_config()
        self.cache_dir = data_cache_dir(cfg)
        self.encode_stats: dict = {}

    # -- assets
    def _write_config(self) -> None:
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            _atomic_write(self.run_dir / "config.yaml", yaml.safe_dump(to_dict(self.cfg), sort_keys=False))

    def _model_config(self):
        """The TransformerConfig to train: named (random init) or the checkpoint's, with our dtype and remat."""
        return checkpoints.transformer_config(self.cfg.model)

    def _build_model(self, mc, source):
        """The model with its parameters in their shardings on the mesh (float32 master weights)."""
        from contentv_jax.models import transformer as T
        from contentv_jax.sharding.init import create_sharded, state_shardings

        seed = self.cfg.seed
        if source == "random":
            return create_sharded(lambda: T.MMDiT(mc, rngs=nnx.Rngs(seed)), self.mesh)
        if source == "ours":
            return checkpoints.load_sharded(self.cfg.model.init, lambda: T.MMDiT(mc, rngs=nnx.Rngs(0)), self.mesh)
        model = checkpoints.load_transformer(
            self.cfg.model.init, dtype=mc.dtype, param_dtype="float32", remat_policy=mc.remat_policy
        )
        graphdef, state = nnx.split(model)
        sh = state_shardings(state, self.mesh)
        state = jax.tree.map(lambda x, s: jax.device_put(x, s), state, sh)
        return nnx.merge(graphdef, state)

    # -- state
    def _init_state(self, model_config, source, tx):
        from contentv_jax.sharding.init import state_shardings

        cfg = self.cfg
        model = self._build_model(model_config, source)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        p_sh = nnx.to_pure_dict(state_shardings(params, self.mesh))
        self.param_state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
        template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
        pure = nnx.to_pure_dict(params)
        if any(x.dtype != jnp.float32 for x in jax.tree.leaves(pure)):
            raise ValueError("master weights must be float32 (model param_dtype)")
        repl = NamedSharding(self.mesh, PartitionSpec())
        rest = jax.device_put(rest, repl)
        opt_abstract = jax.eval_shape(tx.init, pure)
        opt_sh = _match_tree(opt_abstract, jax.tree.structure(pure), p_sh, repl)
        with jax.set_mesh(self.mesh):
            opt_state = jax.jit(tx.init, out_shardings=opt_sh)(pure)
        state = {
            "step": jax.device_put(jnp.zeros((), jnp.int32), repl),
            "rng": jax.device_put(jax.random.key_data(jax.random.key(cfg.seed)), repl),
            "params": pure,
            "opt_state": opt_state,
            "ema": jax.tree.map(jnp.copy, pure) if cfg.optimizer.ema_decay > 0 else None,
        }
        # SFT: the frozen reference = the run's initial weights (model.init) in bfloat16, sharded like the
        # trained params; outside the train state, so never in the optimizer, never updated, never saved
        self.ref_params = None
        if cfg.sft.kl_weight > 0:
            with jax.set_mesh(self.mesh):
                self.ref_params = jax.jit(
                    lambda p: jax.tree.map(lambda x: x.astype(jnp.bfloat16), p), out_shardings=p_sh
                )(pure)
            self.ref_sh = p_sh
        state_sh = {
            "step": repl,
            "rng": repl,
            "params": p_sh,
            "opt_state": opt_sh,
            "ema": p_sh if cfg.optimizer.ema_decay > 0 else None,
        }
        return graphdef, rest, template, state, state_sh, model_config

    BATCH_SPEC = PartitionSpec(("data", "fsdp"))  # batch rows over (data, fsdp), replicated over sequence

    def _batch_sharding(self):
        sh = NamedSharding(self.mesh, self.BATCH_SPEC)
        return {"latents": sh, "prompt_embeds": sh, "pooled": sh}

    def host_rows(self, global_batch_size: int) -> slice:
        """The rows of a global batch this process's devices hold (and so the rows its data loader reads)."""
        return local_batch_slice(global_batch_size, self.mesh, self.BATCH_SPEC)

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
        graphdef, rest, template, state, state_sh, _ = self._init_state(model_config, source, self.tx)
        self.state, self.state_sh, self.template = state, state_sh, template
        self.graphdef, self.rest = graphdef, rest
        repl = NamedSharding(self.mesh, PartitionSpec())
        step_fn = make_train_step(
            graphdef, template, rest, self.tx, cfg, jax.device_put(jnp.asarray(empty_ctx[0]), repl),
            jax.device_put(jnp.asarray(empty_pooled[0]), repl),
        )
        self.batch_sh = self._batch_sharding()
        ref_sh = self.ref_sh if self.ref_params is not None else None
        self._step = jax.jit(
            step_fn,
            in_shardings=(state_sh, self.batch_sh, ref_sh),
            out_shardings=(state_sh, None),
            donate_argnums=(0,),
        )
        self.ckpt = TrainCheckpointer(
            self.run_dir / "checkpoints", every=cfg.checkpoint.every, keep=cfg.checkpoint.keep,
            async_save=cfg.checkpoint.async_save,
        )
        self.start_step = 0
        latest = self.ckpt.latest_step() if cfg.checkpoint.resume else None
        if latest is not None:
            self.state, data_state = self.ckpt.restore(latest, self.state)
            self.data_iter.set_state(data_state)
            self.start_step = latest
        return self

    def export(self, dst: Path) -> None:
        """Write the trained weights (the EMA when enabled) as a transformer checkpoint loadable by
        ``load_transformer`` (``contentv_jax.checkpoints.export_checkpoint``: every process writes its shards)."""
        weights = self.state["ema"] if self.state.get("ema") is not None else self.state["params"]
        state = jax.tree.map(lambda v: v, self.param_state)
        nnx.replace_by_pure_dict(state, weights)
        model_state = nnx.state(nnx.merge(self.graphdef, state, self.rest))
        checkpoints.export_checkpoint(dst, model_state, self.model_config.to_dict())

    def global_batch(self, local: dict) -> dict:
        """This process's rows (:meth:`host_rows`; e.g. ``data_iter``'s batch) -> global jax arrays
        sharded over (data, fsdp). With one process ``local`` is the whole batch."""
        rows = local.get("global_batch_size")
        arrays = {k: np.asarray(local[k]) for k in ("latents", "prompt_embeds", "pooled")}
        return global_batch(arrays, self.mesh, self.BATCH_SPEC, global_batch_size=rows)

    def train_step(self, batch: dict):
        """Run one compiled step on a global batch; returns host metrics (a dict of floats)."""
        with jax.set_mesh(self.mesh), activation_sharding(self.mesh):
            self.state, metrics = self._step(self.state, batch, self.ref_params)
        return {k: float(v) for k, v in jax.device_get(metrics).items()}

    # -- the loop
    def run(self) -> dict:
        """Train until ``cfg.steps``; returns a summary (``final_step``, ``losses``, ``skipped_files``, ...)."""
        cfg = self.cfg
        if not hasattr(self, "_step"):
            self.setup()
        logger = MetricsLogger(self.run_dir, enabled=self.main, tensorboard=cfg.logging.tensorboard)
        bar = ProgressBar(cfg.steps, self.start_step, enabled=self.main and cfg.logging.progress_bar)
        stop = {"sigterm": False}
        prev = signal.getsignal(signal.SIGTERM)
        try:
            signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__("sigterm", True))
        except ValueError:  # not the main thread
            prev = None
        step = self.start_step
        nonfinite = 0
        losses = []
        status = "completed"
        t_last, n_last = time.perf_counter(), 0
        try:
            while step < cfg.steps:
                local = next(self.data_iter)
                if int(local.get("step", step)) != step:
                    raise RuntimeError(f"data iterator is at step {local['step']}, the trainer at {step}")
                batch = self.global_batch(local)
                m = self.train_step(batch)
                step += 1
                tokens = latent_tokens(batch["latents"].shape)
                n_last += 1
                losses.append(m["loss"])
                if not m.pop("finite"):
                    nonfinite += 1
                    logger.event(step, event="nonfinite_loss", loss=str(m["loss"]), grad_norm=str(m["grad_norm"]),
                                 count=nonfinite)
                    bar.write(f"step {step}: non-finite loss {m['loss']} (grad norm {m['grad_norm']}); update skipped")
                    if nonfinite >= cfg.max_nonfinite:
                        status = f"stopped: {nonfinite} non-finite losses (max_nonfinite={cfg.max_nonfinite})"
                        break
                if step % cfg.logging.every == 0 or step == cfg.steps:
                    now = time.perf_counter()
                    sps = n_last / max(now - t_last, 1e-9)
                    t_last, n_last = now, 0
                    m.update(steps_per_s=sps, tokens_per_s=sps * tokens)
                    logger.log(step, m)
                bar.update(1, loss=m["loss"], **{"steps/s": m.get("steps_per_s", 0.0), "tok/s": m.get("tokens_per_s", 0.0)})
                self.ckpt.save(step, self.state, self.data_iter.get_state())
                if stop["sigterm"]:
                    status = "interrupted by SIGTERM (checkpoint saved)"
                    break
            if step not in self.ckpt.all_steps():
                self.ckpt.save(step, self.state, self.data_iter.get_state(), force=True)
            self.ckpt.wait()
            if cfg.checkpoint.export and status == "completed":
                self.export(self.run_dir / "transformer")
        finally:
            self.ckpt.close()
            bar.close()
            logger.flush()
            logger.close()
            if prev is not None:
                signal.signal(signal.SIGTERM, prev)
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


def train(cfg: TrainConfig, *, devices=None) -> dict:
    """Run a training job (see module docstring); returns the summary dict."""
    return Trainer(cfg, devices=devices).setup().run()
