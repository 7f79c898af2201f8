"""The tiny random demo model: a complete ContentV model directory that needs no download.

It holds the parts the default training run (``python -m contentv_jax.train``, ``configs/train/tiny.yaml``)
builds for itself: the tiny text encoders (``contentv_jax.text.build_tiny_text_encoders`` sized for the tiny
transformer), the tiny Wan VAE (``contentv_jax.models.vae.get_config("tiny")``), and a randomly initialised
tiny MM-DiT (``transformer.get_config("tiny")`` on the 16-channel Wan latent space, bfloat16 compute), each
written by our real save code (``contentv_jax.checkpoints.save_checkpoint``, as the trainer's export), plus
``scheduler/scheduler_config.json`` with the sampling flow shift. Its videos are noise: it exists so that
the web UI and the sampler work on a fresh machine.

Layout (``ContentVPipeline.from_pretrained`` opens it): ``transformer/``, ``vae/``, ``scheduler/``,
``text_encoder{,_2,_3}/``, ``tokenizer{,_2,_3}/`` and ``demo.json`` (what this is, and its version).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

DEMO_VERSION = 1
MARKER = "demo.json"
SEED = 0  # the default training run's seed (configs/train/tiny.yaml)


def default_cache_dir() -> Path:
    """``$CONTENTV_CACHE/tiny-demo`` if ``CONTENTV_CACHE`` is set, else ``~/.cache/contentv-jax/tiny-demo``."""
    root = os.environ.get("CONTENTV_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "contentv-jax"
    return base / "tiny-demo"


def is_demo_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a complete demo directory of this :data:`DEMO_VERSION`."""
    marker = Path(path) / MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("version") == DEMO_VERSION
    except (OSError, ValueError):
        return False


def build_demo_model(dst: str | os.PathLike, *, seed: int = SEED) -> Path:
    """Write the demo model directory to ``dst`` (built in a temporary sibling, then renamed; an existing
    ``dst`` is replaced only once the new one is complete). Returns ``Path(dst)``."""
    from flax import nnx

    from contentv_jax import scheduler as flow
    from contentv_jax.atomic import atomic_dir
    from contentv_jax.models import transformer as T
    from contentv_jax.models.vae import init_vae
    from contentv_jax.models.vae import get_config as vae_config
    from contentv_jax.text import build_tiny_text_encoders
    from contentv_jax.checkpoints import save_checkpoint

    # The default run's transformer: the named tiny config on the Wan latent space, bfloat16 compute,
    # float32 parameters (contentv_jax.train.trainer, ``_model_config``).
    cfg = T.get_config("tiny", in_channels=16, out_channels=16, dtype="bfloat16", param_dtype="float32")
    pool = cfg.pooled_projection_dim
    dst = Path(dst)
    with atomic_dir(dst) as tmp:
        text_tmp = tmp / "_text"
        build_tiny_text_encoders(
            text_tmp, clip_dims=(pool // 2, pool - pool // 2), t5_dim=cfg.joint_attention_dim, seed=seed
        )
        for sub in sorted(p.name for p in text_tmp.iterdir()):
            os.replace(text_tmp / sub, tmp / sub)
        shutil.rmtree(text_tmp)
        model = T.init_model(cfg, seed=seed)
        save_checkpoint(tmp / "transformer", nnx.state(model), cfg.to_dict())
        vcfg = vae_config("tiny")
        vae = init_vae(vcfg, seed=seed + 1)
        save_checkpoint(tmp / "vae", nnx.state(vae, nnx.Param), vcfg.to_diffusers())
        (tmp / "scheduler").mkdir()
        scheduler = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": flow.DEFAULT_SAMPLING_SHIFT}
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2) + "\n")
        info = {"kind": "contentv-jax tiny random demo model", "version": DEMO_VERSION, "seed": seed}
        (tmp / MARKER).write_text(json.dumps(info, indent=2) + "\n")
    return dst


def ensure_demo_model(dst: str | os.PathLike | None = None) -> Path:
    """The demo directory at ``dst`` (default :func:`default_cache_dir`), built first if absent or stale."""
    dst = Path(dst) if dst is not None else default_cache_dir()
    if not is_demo_dir(dst):
        build_demo_model(dst)
    return dst
