"""Everything between a training config and encoded latents: ``prepare(cfg)``.

One function that the trainer and ``python -m contentv_jax.encode --config`` both call, so the two read
one set of config keys and can never disagree: text encoders (``text.path``, or tiny random ones sized
for the transformer, saved to ``<run_dir>/assets/text`` and reloaded through the real loading code),
the VAE (``vae.path``, or a tiny random one of config ``vae.name`` saved to ``<run_dir>/assets/vae``
in our checkpoint format and reloaded with ``load_vae``), the dataset (``data.dir``, or the synthetic
moving-shapes set rendered into ``<run_dir>/data``) and the encode stage into ``data.cache_dir``
(default ``<run_dir>/encoded``), skipped when a complete cache made with the same fps, max shape and
text length is there (its ``index.json`` is written last, so a present index means a complete encode).

Only the main process builds, renders and encodes while the others wait; then every process reads the
finished index (the cache must be on a file system all hosts share). A failure on the main process
stops every process.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any

from flax import nnx

from contentv_jax.config import ConfigError
from contentv_jax.data.encode import encode_dataset, read_index
from contentv_jax.data.synthetic import make_synthetic_dataset
from contentv_jax.sharding.distributed import is_main_process, run_on_main_then_all


@dataclasses.dataclass(frozen=True)
class Prepared:
    """What :func:`prepare` leaves: ``encoded`` (the records directory, ``index.json`` + ArrayRecords),
    ``stats`` (the encode stage's counts and skipped files), ``latent_channels`` of the records."""

    encoded: Path
    stats: dict
    latent_channels: int


def cache_dir(cfg: Any) -> Path:
    """The encoded-records directory of a training config: ``data.cache_dir`` or ``<run_dir>/encoded``."""
    return Path(cfg.data.cache_dir).absolute() if cfg.data.cache_dir else Path(cfg.run_dir).absolute() / "encoded"


def text_encoders(cfg: Any, model_config):
    """``text.path`` loaded, or tiny random encoders sized for ``model_config`` (context width =
    ``joint_attention_dim``, pooled = the two CLIPs' widths summing to ``pooled_projection_dim``),
    saved to ``<run_dir>/assets/text`` and reloaded.

    Raises:
      ConfigError: naming ``text.path`` when the encoders' widths do not match the transformer's.
    """
    from contentv_jax.text import TextEncoders, build_tiny_text_encoders

    t = cfg.text
    if t.path:
        text = TextEncoders.from_pretrained(t.path)
    else:
        pool = model_config.pooled_projection_dim
        clip = (pool // 2, pool - pool // 2)
        dst = Path(cfg.run_dir).absolute() / "assets" / "text"
        if not dst.exists():
            build_tiny_text_encoders(dst, clip_dims=clip, t5_dim=model_config.joint_attention_dim, seed=cfg.seed)
        text = TextEncoders.from_pretrained(dst)
    for got, want in ((text.context_dim, model_config.joint_attention_dim), (text.pooled_dim, model_config.pooled_projection_dim)):
        if got != want:
            raise ConfigError(f"config key 'text.path': the text encoders give width {got}, the transformer expects {want}")
    return text


def tiny_vae(cfg: Any) -> Path:
    """``<run_dir>/assets/vae``: a tiny random VAE of config ``vae.name`` in our checkpoint format (as
    ``converters.from_diffusers --component vae`` writes it), built unless it exists. Save only, no load:
    callable from one process of a multi-process job.

    Raises:
      ConfigError: naming ``vae.name`` for an unknown VAE config.
    """
    from contentv_jax.checkpoints import save_checkpoint
    from contentv_jax.models.vae import get_config, init_vae

    dst = Path(cfg.run_dir).absolute() / "assets" / "vae"
    if not dst.exists():
        try:
            vcfg = get_config(cfg.vae.name)
        except ValueError as e:
            raise ConfigError(f"config key 'vae.name': {e}") from None
        model = init_vae(vcfg, seed=cfg.seed + 1)
        save_checkpoint(dst, nnx.state(model, nnx.Param), vcfg.to_diffusers())
    return dst


def vae(cfg: Any):
    """``vae.path`` loaded with ``load_vae``, or the tiny random VAE of :func:`tiny_vae` (built if needed).

    Raises:
      ConfigError: naming ``vae.name`` for an unknown VAE config.
    """
    from contentv_jax.checkpoints import load_vae

    return load_vae(cfg.vae.path or tiny_vae(cfg))


def prepare(cfg: Any, model_config=None) -> Prepared:
    """Build or load the text encoders and VAE, render the synthetic dataset (no ``data.dir``) and encode
    once (see module docstring); every process returns the finished cache.

    Args:
      cfg: a ``TrainConfig`` (reads ``run_dir``, ``seed``, ``model``, ``vae``, ``text``, ``data``,
        ``buckets``, ``logging.progress_bar``).
      model_config: the ``TransformerConfig`` to encode for; default: the one ``cfg.model`` names
        (``contentv_jax.checkpoints.transformer_config``).
    Raises:
      ConfigError: the VAE's or the records' latent channels differ from the transformer's ``in_channels``
        (named ``model.latent_channels``), or a text / VAE config mistake (named).
      ValueError: every data file was skipped.
    """
    if model_config is None:
        from contentv_jax.checkpoints import transformer_config

        model_config = transformer_config(cfg.model)[0]
    d, b = cfg.data, cfg.buckets
    cache = cache_dir(cfg)
    want = {"fps": d.fps, "max_shape": [b.max_frames, b.max_height, b.max_width], "max_sequence_length": cfg.text.max_length}
    if b.max_frames == 1:
        want["images_per_video"] = d.images_per_video
    data_dir = Path(d.dir) if d.dir else Path(cfg.run_dir).absolute() / "data"

    def encode():
        have = None
        if (cache / "index.json").exists():
            index = read_index(cache)
            have = {"fps": index["fps"], "max_shape": index["max_shape"],
                    "max_sequence_length": index["text"]["max_sequence_length"]}
            if b.max_frames == 1:
                have["images_per_video"] = index.get("images_per_video")
            if have != want:
                warnings.warn(f"encoded cache {cache} was made with {have}, this run needs {want}: re-encoding")
        if have == want:
            return
        text, v = text_encoders(cfg, model_config), vae(cfg)
        z_dim = v.config.z_dim
        if z_dim != model_config.in_channels:
            raise ConfigError(
                f"config key 'model.latent_channels': the VAE's {z_dim} latent channels do not match the "
                f"transformer's in_channels={model_config.in_channels}"
            )
        if not d.dir and not (data_dir / "captions.jsonl").exists():
            # one frame size (the max shape): one bucket, one compile
            make_synthetic_dataset(
                data_dir, num_videos=d.num_synthetic, seed=cfg.seed, num_frames=d.synthetic_frames,
                fps=d.fps, sizes=((b.max_height, b.max_width),),
            )
        encode_dataset(
            data_dir, cache, v, text, fps=d.fps, max_frames=b.max_frames, max_height=b.max_height,
            max_width=b.max_width, max_sequence_length=cfg.text.max_length, seed=cfg.seed,
            images_per_video=d.images_per_video, decode_workers=d.encode_workers, vae_batch_size=d.encode_batch_size,
            progress=cfg.logging.progress_bar,
        )

    run_on_main_then_all("encode", encode if is_main_process() else None)
    index = read_index(cache)
    if not index["stats"]["records"]:
        raise ValueError(f"no usable clips in {data_dir}: every file was skipped ({index['stats']['skipped']})")
    channels = index["latent_channels"]
    if channels != model_config.in_channels:
        raise ConfigError(
            f"config key 'model.latent_channels': the encoded latents have {channels} channels, "
            f"the transformer takes {model_config.in_channels}"
        )
    return Prepared(encoded=cache, stats=index["stats"], latent_channels=channels)
