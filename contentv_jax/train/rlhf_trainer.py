"""The RLHF training mode (``mode: rlhf``): reward-gradient fine-tuning beside flow matching.

Shares the :class:`contentv_jax.train.trainer.Trainer`'s mesh, model loading, float32 master weights, optimizer,
Orbax checkpoints, logging, SIGTERM handling and resume; replaces its data with prompts and its step with
:func:`contentv_jax.train.rlhf.make_rlhf_step` (ContentV report, arXiv 2506.05343, section 6.2).

Prompts (``--prompts FILE`` / ``prompts``): one per line, or JSONL lines with a ``"prompt"`` (or ``"caption"``)
field; encoded once with the SD3 text encoders (as the encode stage does) and cached in
``<run_dir>/prompts/`` keyed by the file's content and the text settings; the negative prompt is ``rlhf.negative_prompt``
(the official demo's). Held-out prompts: ``rlhf.eval_prompts`` or, when empty, the last ``rlhf.eval_batch`` lines of the file
(not trained on). Prompt order: step ``s`` takes global rows ``s * B .. s * B + B - 1`` of an endless sequence of
epochs, each a permutation drawn from ``(seed, epoch)``, so every host and every resume agree; each host loads
only its rows (:meth:`Trainer.host_rows`).

Every ``rlhf.eval_every`` steps the held-out prompts are sampled from fixed noise and scored by the training
reward (and the ``reward.monitor_*`` one): ``eval/reward_mean`` etc. in TensorBoard / ``metrics.jsonl`` and a
grid of the scored frames (``eval/frames``) in TensorBoard.
"""

from __future__ import annotations

import hashlib
import json
import math
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from contentv_jax import scheduler as flow
from contentv_jax.config import ConfigError
from contentv_jax.train import rlhf
from contentv_jax.train.checkpoint import TrainCheckpointer
from contentv_jax.train.metrics import MetricsLogger, ProgressBar
from contentv_jax.train.optim import learning_rate_schedule, make_optimizer
from contentv_jax.train.trainer import DTYPES, Trainer, _atomic_write, _test_signal_after_step


def read_prompts(path: str | Path) -> list[str]:
    """Prompts of ``path``: one per non-empty line, or JSONL objects with ``"prompt"`` or ``"caption"``.

    Raises:
      ConfigError: the file is missing or holds no prompt (named ``prompts``), or a JSONL line has neither
        field or a non-string value (file and line named).
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config key 'prompts': {str(path)!r} is not a file (one prompt per line, or JSONL)")
    out = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{p}:{n}: not valid JSON ({e.msg})") from None
            text = obj.get("prompt", obj.get("caption"))
            if not isinstance(text, str) or not text.strip():
                raise ConfigError(f"{p}:{n}: expected a non-empty string field 'prompt' or 'caption'")
            out.append(text.strip())
        else:
            out.append(line)
    if not out:
        raise ConfigError(f"config key 'prompts': {str(path)!r} holds no prompt")
    return out


def prompt_rows(seed: int, step: int, batch: int, num_prompts: int) -> np.ndarray:
    """Prompt indices ``(batch,)`` of ``step``: rows ``step * batch ...`` of epochs, each a permutation drawn
    from ``(seed, epoch)`` (NumPy Philox), so the order is a function of the step only."""
    idx = step * batch + np.arange(batch)
    epochs, pos = idx // num_prompts, idx % num_prompts
    perms = {int(e): np.random.Generator(np.random.Philox(key=[seed, int(e)])).permutation(num_prompts)
             for e in np.unique(epochs)}
    return np.array([perms[int(e)][p] for e, p in zip(epochs, pos)], np.int64)


def build_tiny_clip_reward(dst: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A tiny random ``transformers.CLIPModel`` (width 32, 2 layers per tower, 32-pixel images) with the CLIP
    tokenizer of ``tokenizer_dir``, saved with ``save_pretrained`` to ``dst`` (temporary sibling, then renamed)."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    from contentv_jax.atomic import atomic_dir

    tok = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=32, eos_token_id=tok.eos_token_id,
                         bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(seed)
    model = CLIPModel(cfg).eval()
    with atomic_dir(dst) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return dst


def _grid(frames: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) in [0, 1] -> one (rows*H, cols*W, 3) image."""
    n, h, w, c = frames.shape
    cols = int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    out = np.zeros((rows * h, cols * w, c), np.float32)
    for i, f in enumerate(frames):
        r, q = divmod(i, cols)
        out[r * h:(r + 1) * h, q * w:(q + 1) * w] = f
    return out


class RLHFTrainer(Trainer):
    """One RLHF job: ``RLHFTrainer(cfg).setup().run()`` (``cfg.mode == "rlhf"``)."""

    BATCH_KEYS = ("context", "pooled", "negative_context", "negative_pooled", "input_ids")

    def __init__(self, cfg, *, devices=None):
        if cfg.mode != "rlhf":
            raise ConfigError(f"config key 'mode': RLHFTrainer needs 'rlhf', got {cfg.mode!r}")
        super().__init__(cfg, devices=devices)
        if not cfg.prompts:
            raise ConfigError("config key 'prompts': mode rlhf needs a prompts file (--prompts FILE)")
        prompts = read_prompts(cfg.prompts)  # before any compute: an empty file is an error here
        r = cfg.rlhf
        if r.eval_every and not r.eval_prompts:
            if len(prompts) <= r.eval_batch:
                raise ConfigError(
                    f"config key 'rlhf.eval_batch': {len(prompts)} prompts leave none to train on after holding out "
                    f"{r.eval_batch} (set rlhf.eval_prompts or a smaller rlhf.eval_batch)")
            self.eval_texts, prompts = prompts[-r.eval_batch:], prompts[:-r.eval_batch]
        elif r.eval_every:
            self.eval_texts = read_prompts(r.eval_prompts)[: r.eval_batch]
        else:
            self.eval_texts = []
        self.train_texts = prompts
        if r.batch % self.batch_multiple:
            raise ConfigError(f"config key 'rlhf.batch': {r.batch} is not divisible by the mesh's data x fsdp "
                              f"(and processes) = {self.batch_multiple}")
        if r.eval_every and len(self.eval_texts) % self.batch_multiple:
            raise ConfigError(f"config key 'rlhf.eval_batch': {len(self.eval_texts)} held-out prompts are not "
                              f"divisible by the mesh's data x fsdp = {self.batch_multiple}")
        if r.kl_weight > 0 and cfg.model.init == "random":
            raise ConfigError("config keys 'rlhf.kl_weight' and 'model.init': a velocity regulariser needs a "
                              "pre-trained model.init to stay close to, not 'random'")

    # -- prompts, text, reward
    def _encode_prompts(self, texts: list[str], what: str) -> dict:
        """SD3 text embeddings of ``texts`` and of the negative prompt, cached under ``<run_dir>/prompts``."""
        from contentv_jax.data import prepare as data_prepare

        cfg = self.cfg
        key = hashlib.sha256(json.dumps([texts, cfg.rlhf.negative_prompt, cfg.text.path, cfg.text.max_length,
                                         cfg.seed]).encode()).hexdigest()[:16]
        path = self.run_dir / "prompts" / f"{what}-{key}.npz"
        if not path.exists():
            text = data_prepare.text_encoders(cfg, self.model_config)
            pe, pp = text.encode(texts, max_sequence_length=cfg.text.max_length)
            ne, npool = text.encode([cfg.rlhf.negative_prompt], max_sequence_length=cfg.text.max_length)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp.npz")
            np.savez(tmp, context=np.asarray(pe, np.float32), pooled=np.asarray(pp, np.float32),
                     negative_context=np.asarray(ne, np.float32), negative_pooled=np.asarray(npool, np.float32))
            tmp.replace(path)
        with np.load(path) as f:
            return {k: f[k] for k in f.files}

    def _reward(self, name: str, path: str):
        from contentv_jax.models.reward import AnalyticConfig
        from contentv_jax.rewards_io import load_reward

        if name == "analytic":
            return load_reward("analytic", config=AnalyticConfig(target=tuple(self.cfg.reward.target)))
        if not path:  # tiny random CLIP built by the project
            dst = self.run_dir / "assets" / "reward"
            if not dst.exists():
                from contentv_jax.data import prepare as data_prepare

                data_prepare.text_encoders(self.cfg, self.model_config)  # makes assets/text (its CLIP tokenizer)
                build_tiny_clip_reward(dst, self.run_dir / "assets" / "text" / "tokenizer", seed=self.cfg.seed)
            path = dst
        return load_reward(name, path)

    def prepare(self):
        from contentv_jax.data import prepare as data_prepare

        self._write_config()
        self.prompt_embeds = self._encode_prompts(self.train_texts, "train")
        self.eval_embeds = self._encode_prompts(self.eval_texts, "eval") if self.eval_texts else None
        self.vae = data_prepare.vae(self.cfg)
        if self.vae.config.z_dim != self.model_config.in_channels:
            raise ConfigError(f"config key 'vae.path': the VAE's {self.vae.config.z_dim} latent channels do not match "
                              f"the transformer's in_channels={self.model_config.in_channels}")
        self.reward = self._reward(self.cfg.reward.name, self.cfg.reward.path)
        self.monitor = (self._reward(self.cfg.reward.monitor_name, self.cfg.reward.monitor_path)
                        if self.cfg.reward.monitor_name else None)
        self.train_ids = self.reward.tokenize(self.train_texts)
        return self.model_config, self.model_source, None

    def latent_shape(self, batch: int) -> tuple[int, ...]:
        r = self.cfg.rlhf
        return (batch, (r.num_frames - 1) // 4 + 1, r.height // 8, r.width // 8, self.model_config.in_channels)

    def setup(self):
        cfg = self.cfg
        self.prepare()
        self.tx = make_optimizer(cfg.optimizer)
        init = self._init_state(self.tx)
        graphdef, rest, template = init.graphdef, init.rest, init.template
        state, state_sh = dict(init.state), dict(init.shardings)
        state.pop("ema", None)
        state_sh.pop("ema", None)
        self.state, self.state_sh, self.template, self.graphdef, self.rest = state, state_sh, template, graphdef, rest
        dtype = DTYPES[cfg.model.dtype]
        self.apply = rlhf.make_apply(graphdef, template, rest, dtype)
        repl = NamedSharding(self.mesh, PartitionSpec())
        vae_graphdef, vae_state = nnx.split(self.vae)
        r_graphdef, r_state = nnx.split(self.reward.model)
        self.aux = {"vae": jax.device_put(vae_state, repl), "reward": jax.device_put(r_state, repl), "ref": None}
        self.reward_apply = rlhf.make_reward_apply(r_graphdef)
        step_fn = rlhf.make_rlhf_step(
            self.apply, self.reward_apply, vae_graphdef, self.tx, cfg.rlhf, self.latent_shape(cfg.rlhf.batch),
            lr_fn=learning_rate_schedule(cfg.optimizer),
        )
        row = NamedSharding(self.mesh, self.batch_spec)
        self.batch_sh = {k: row for k in self.BATCH_KEYS if k != "input_ids" or self.reward.context_length}
        self._step = jax.jit(step_fn, in_shardings=(state_sh, self.batch_sh, None), out_shardings=(state_sh, None),
                             donate_argnums=(0,))
        self._eval = self._make_eval(vae_graphdef) if self.eval_embeds is not None else None
        self.ckpt = TrainCheckpointer(self.run_dir / "checkpoints", every=cfg.checkpoint.every,
                                      keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
        self.start_step = 0
        latest = self.ckpt.latest_step() if cfg.checkpoint.resume else None
        if latest is not None:
            self.state, data_state = self.ckpt.restore(latest, self.state)
            if data_state.get("step") != latest or data_state.get("num_prompts") != len(self.train_texts):
                raise ValueError(f"checkpoint {latest}: prompt state {data_state} does not match this run")
            self.start_step = latest
        return self

    # -- batches
    def host_batch(self, step: int, embeds: dict, ids: np.ndarray, rows: np.ndarray) -> dict:
        """This host's rows of the global batch for prompt indices ``rows`` (global batch order)."""
        mine = rows[self.host_rows(len(rows))]
        local = {
            "context": embeds["context"][mine],
            "pooled": embeds["pooled"][mine],
            "negative_context": np.repeat(embeds["negative_context"], len(mine), axis=0),
            "negative_pooled": np.repeat(embeds["negative_pooled"], len(mine), axis=0),
        }
        if self.reward.context_length:
            local["input_ids"] = ids[mine]
        from contentv_jax.sharding.distributed import global_batch

        return global_batch(local, self.mesh, self.batch_spec, global_batch_size=len(rows))

    def batch_for(self, step: int) -> tuple[dict, np.ndarray]:
        rows = prompt_rows(self.cfg.seed, step, self.cfg.rlhf.batch, len(self.train_texts))
        return self.host_batch(step, self.prompt_embeds, self.train_ids, rows), rows

    # -- held-out evaluation
    def _make_eval(self, vae_graphdef):
        r = self.cfg.rlhf
        sigmas = jnp.asarray(flow.sampling_sigmas(r.num_steps, r.shift))
        n = len(self.eval_texts)
        x0 = jax.random.normal(jax.random.key(self.cfg.seed + 7919), self.latent_shape(n), jnp.float32)
        frame = max(r.reward_frame, 0)
        monitor = None
        if self.monitor is not None:
            m_graphdef, m_state = nnx.split(self.monitor.model)
            monitor = (rlhf.make_reward_apply(m_graphdef), m_state)
            self.monitor_ids = self.monitor.tokenize(self.eval_texts)

        def eval_fn(params, batch, aux, monitor_state):
            cond = {k: batch[k] for k in ("context", "pooled", "negative_context", "negative_pooled")}
            x_n, _ = rlhf.rollout(self.apply, params, x0, sigmas, cond, r.guidance_scale, jnp.zeros((1,), jnp.int32))
            frames = rlhf.decode_frame(nnx.merge(vae_graphdef, aux["vae"]), x_n, frame)
            out = {"reward": self.reward_apply(aux["reward"], frames, batch.get("input_ids")), "frames": frames}
            if monitor is not None:
                out["monitor"] = monitor[0](monitor_state, frames, batch.get("monitor_ids"))
            return out

        self.monitor_state = None if monitor is None else monitor[1]
        self.eval_ids = self.reward.tokenize(self.eval_texts)
        return jax.jit(eval_fn)

    def evaluate(self) -> dict:
        """Held-out reward: ``{"eval/reward_mean", ..._std, ..._min, ..._max[, "eval/monitor_mean"]}`` and the frames."""
        rows = np.arange(len(self.eval_texts))
        batch = self.host_batch(0, self.eval_embeds, self.eval_ids, rows)
        if self.monitor is not None and self.monitor.context_length:
            batch["monitor_ids"] = jnp.asarray(self.monitor_ids)
        with jax.set_mesh(self.mesh):
            out = jax.device_get(self._eval(self.state["params"], batch, self.aux, self.monitor_state))
        r = np.asarray(out["reward"], np.float64)
        m = {"eval/reward_mean": r.mean(), "eval/reward_std": r.std(), "eval/reward_min": r.min(),
             "eval/reward_max": r.max()}
        if "monitor" in out:
            m["eval/monitor_mean"] = float(np.mean(out["monitor"]))
        return m, np.asarray(out["frames"])

    def train_step(self, batch: dict):
        from contentv_jax.sharding.logical import activation_sharding

        with jax.set_mesh(self.mesh), activation_sharding(self.mesh, self.rules):
            self.state, metrics = self._step(self.state, batch, self.aux)
        metrics = jax.device_get(metrics)
        chosen = [int(c) for c in np.asarray(metrics.pop("chosen_steps"))]
        out = {k: float(v) for k, v in metrics.items()}
        out["chosen_steps"] = chosen
        return out

    # -- the loop
    def run(self) -> dict:
        """Train until ``cfg.steps``; returns a summary (``final_step``, ``rewards``, ``eval``, ``status``, ...)."""
        cfg = self.cfg
        if not hasattr(self, "_step"):
            self.setup()
        logger = MetricsLogger(self.run_dir, enabled=self.main, tensorboard=cfg.logging.tensorboard)
        bar = ProgressBar(cfg.steps, self.start_step, enabled=self.main and cfg.logging.progress_bar)
        stop = {"sigterm": False}
        prev = signal.getsignal(signal.SIGTERM)
        try:
            signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__("sigterm", True))
        except ValueError:
            prev = None
        step, nonfinite, status = self.start_step, 0, "completed"
        rewards, evals = [], []
        every = cfg.rlhf.eval_every

        def do_eval(at):
            m, frames = self.evaluate()
            evals.append({"step": at, **m})
            logger.log(at, m)
            logger.image(at, "eval/frames", _grid(frames))
            bar.write(f"step {at}: held-out reward {m['eval/reward_mean']:.4f} +- {m['eval/reward_std']:.4f}")

        t_last = time.perf_counter()
        try:
            if every and step == 0:
                do_eval(0)
            while step < cfg.steps:
                batch, rows = self.batch_for(step)
                m = self.train_step(batch)
                step += 1
                rewards.append(m["reward_mean"])
                chosen = m.pop("chosen_steps")
                if not m.pop("finite"):
                    nonfinite += 1
                    logger.event(step, event="nonfinite_reward", reward=str(m["reward_mean"]),
                                 grad_norm=str(m["grad_norm"]), count=nonfinite)
                    bar.write(f"step {step}: non-finite reward {m['reward_mean']} (grad norm {m['grad_norm']}); "
                              "update skipped")
                    if nonfinite >= cfg.max_nonfinite:
                        status = f"stopped: {nonfinite} non-finite rewards (max_nonfinite={cfg.max_nonfinite})"
                        break
                if step % cfg.logging.every == 0 or step == cfg.steps:
                    now = time.perf_counter()
                    m["steps_per_s"] = 1.0 / max(now - t_last, 1e-9)
                    m.update({f"chosen_step_{j}": float(c) for j, c in enumerate(chosen)})
                    logger.log(step, m)
                    logger.event(step, chosen_steps=chosen, prompts=[int(x) for x in rows])
                t_last = time.perf_counter()
                bar.update(1, reward=m["reward_mean"])
                if every and step % every == 0:
                    do_eval(step)
                saved = self.ckpt.save(step, self.state, {"step": step, "num_prompts": len(self.train_texts)})
                _test_signal_after_step(step, saved, self.ckpt)  # test-only; a no-op unless its env var is set
                if stop["sigterm"]:
                    status = "interrupted by SIGTERM (checkpoint saved)"
                    break
            if step not in self.ckpt.all_steps():
                self.ckpt.save(step, self.state, {"step": step, "num_prompts": len(self.train_texts)}, force=True)
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
        summary = {"status": status, "start_step": self.start_step, "final_step": step, "rewards": rewards,
                   "eval": evals, "nonfinite": nonfinite, "run_dir": str(self.run_dir)}
        if self.main:
            _atomic_write(self.run_dir / "summary.json",
                          json.dumps({k: v for k, v in summary.items() if k != "rewards"}, indent=1))
        return summary
