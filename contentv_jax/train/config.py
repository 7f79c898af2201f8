"""The training config: nested dataclasses, filled from ``configs/train/*.yaml`` and ``key=value`` overrides.

Loaded with :func:`contentv_jax.config.load_config` (unknown keys are errors naming the dotted key).
:func:`validate` then checks shapes and values before any work (an impossible shape names its key).
Stage configs follow the ContentV report's Table 2 (reference doc section 5).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from contentv_jax.config import ConfigError, load_config
from contentv_jax.sharding.mesh import MeshConfig

# Wan2.1 VAE: 4x temporal (causal: T -> 1 + (T - 1) / 4), 8x spatial compression.
VAE_TEMPORAL_FACTOR = 4
VAE_SPATIAL_FACTOR = 8
# The MM-DiT patchifies latents 2x2 spatially (1 in time).
PATCH_SIZE = 2


@dataclasses.dataclass
class ModelConfig:
    """The MM-DiT to train.

    ``name``: a named transformer config (``tiny``, ``sd35-large``, ``contentv-8b``).
    ``init``: ``random``, or a path to a converted SD3.5 Large or ContentV checkpoint (diffusers
    directory or ours), loaded with ``load_transformer``; the loaded checkpoint's config wins over ``name``.
    ``dtype``: compute dtype (parameters stay float32 master weights). ``remat_policy``: passed to the
    model config (empty keeps the model default). ``attention_kernel``: ``auto`` (cuDNN flash on GPU,
    splash on TPU, ``chunked`` on CPU: never the full score matrix) or an explicit kernel
    (``xla``, ``cudnn``, ``splash``, ``chunked``), refused before anything compiles when it cannot run
    on the present backend (``contentv_jax.models.attention.resolve_kernel``); it overrides the
    kernel named by a loaded checkpoint's config.
    """

    name: str = "tiny"
    init: str = "random"
    dtype: str = "bfloat16"
    remat_policy: str = ""
    attention_kernel: str = "auto"
    latent_channels: int = 0


@dataclasses.dataclass
class VAESection:
    """The video VAE. ``path``: a Wan2.1 VAE (diffusers dir or ours); empty: a tiny random VAE of config
    ``name`` is built, saved to ``<run_dir>/assets/vae`` and reloaded with ``load_vae``."""

    path: str = ""
    name: str = "tiny"


@dataclasses.dataclass
class TextSection:
    """The SD3 text encoders (CLIP-L, bigG, T5). ``path``: a directory for ``TextEncoders.from_pretrained``;
    empty: tiny random encoders (``build_tiny_text_encoders``) saved to ``<run_dir>/assets/text`` and reloaded."""

    path: str = ""
    max_length: int = 32


@dataclasses.dataclass
class DataSection:
    """Training data. ``dir``: video files plus ``captions.jsonl`` (``{"file", "caption"}`` lines); empty:
    the synthetic moving-shapes dataset, rendered into ``<run_dir>/data``. Videos are encoded once into
    ``<run_dir>/encoded`` (``cache_dir`` overrides) and reused by later runs.

    ``caption_dropout``: probability of replacing a sample's text by the empty prompt (for CFG).
    ``fps``: clip frame rate. ``num_synthetic`` / ``synthetic_frames``: the synthetic dataset's video
    count and frames per video (at ``fps``). ``num_threads``: grain read threads. ``images_per_video``:
    an image-only stage (``buckets.max_frames`` 1) takes this many evenly spread frames per video.
    """

    dir: str = ""
    cache_dir: str = ""
    fps: float = 8.0
    caption_dropout: float = 0.1
    num_synthetic: int = 16
    synthetic_frames: int = 24
    num_threads: int = 2
    images_per_video: int = 1


@dataclasses.dataclass
class BucketSection:
    """Aspect-ratio x duration buckets (report section 5) and the batch sizes of Table 2.

    ``max_frames`` x ``max_height`` x ``max_width``: the stage's largest clip in pixels (frames 4k+1;
    height and width multiples of 16); the seven aspect ratios 16:9 3:2 4:3 1:1 3:4 2:3 9:16 keep this
    area; durations are whole seconds at ``data.fps`` up to ``max_frames``
    (``contentv_jax.data.buckets.make_buckets``).
    ``batch_video`` / ``batch_image``: total (global) batch at the largest video / image bucket (smaller
    buckets scale it up to keep tokens per step about constant).
    ``videos`` / ``images``: which kinds of bucket train; ``image_fraction``: share of steps that draw an
    image bucket when both do (the report's balanced image/video mix is 0.5).
    """

    max_frames: int = 9
    max_height: int = 64
    max_width: int = 64
    batch_video: int = 4
    batch_image: int = 0
    videos: bool = True
    images: bool = False
    image_fraction: float = 0.0


@dataclasses.dataclass
class OptimizerSection:
    """optax AdamW with linear warmup, then ``constant`` or ``cosine`` decay over ``decay_steps``;
    gradient clipping by global norm ``grad_clip`` (0 disables); EMA of the parameters when ``ema_decay`` > 0."""

    lr: float = 1e-3
    warmup_steps: int = 10
    schedule: str = "constant"
    decay_steps: int = 0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.0


@dataclasses.dataclass
class ScheduleSection:
    """Training sigmas: ``sigmoid(N(logit_mean, logit_std^2))`` then the flow shift (report: shift 1)."""

    logit_mean: float = 0.0
    logit_std: float = 1.0
    flow_shift: float = 1.0


@dataclasses.dataclass
class CheckpointSection:
    """Orbax CheckpointManager: a save every ``every`` steps (and at the end), the last ``keep`` kept,
    asynchronous when ``async_save``; ``resume`` restores the latest checkpoint of the run dir;
    ``export`` writes the final weights (EMA when enabled) as a transformer checkpoint to
    ``<run_dir>/transformer`` (``load_transformer`` format: the next stage's ``model.init``).
    Every checkpoint and export carries a manifest of per-file sha256 checksums; ``verify`` checks it
    on resume (a damaged newest checkpoint is skipped, with a warning, for the newest intact one);
    false skips the check (faster on trusted storage)."""

    every: int = 50
    keep: int = 2
    async_save: bool = True
    resume: bool = True
    export: bool = True
    verify: bool = True


@dataclasses.dataclass
class LoggingSection:
    """Metrics every ``every`` steps to TensorBoard (``tensorboard``) and ``metrics.jsonl``; tqdm bar."""

    every: int = 1
    tensorboard: bool = True
    progress_bar: bool = True


@dataclasses.dataclass
class TrainConfig:
    """Everything a training run needs (``python -m contentv_jax.train``)."""

    run_dir: str = "runs/tiny"
    seed: int = 0
    steps: int = 200
    max_nonfinite: int = 5
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    vae: VAESection = dataclasses.field(default_factory=VAESection)
    text: TextSection = dataclasses.field(default_factory=TextSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    buckets: BucketSection = dataclasses.field(default_factory=BucketSection)
    optimizer: OptimizerSection = dataclasses.field(default_factory=OptimizerSection)
    schedule: ScheduleSection = dataclasses.field(default_factory=ScheduleSection)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    checkpoint: CheckpointSection = dataclasses.field(default_factory=CheckpointSection)
    logging: LoggingSection = dataclasses.field(default_factory=LoggingSection)


DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "train" / "tiny.yaml"


def validate(cfg: TrainConfig) -> TrainConfig:
    """Check values and shapes before any work; returns ``cfg``.

    Raises:
      ConfigError: naming the key, for frames that are not 4k+1, spatial sizes not divisible by
        ``VAE_SPATIAL_FACTOR * PATCH_SIZE`` (16), batch sizes or
        probabilities out of range, an unknown schedule or dtype, non-positive steps.
    """
    def err(key, msg):
        raise ConfigError(f"config key {key!r}: {msg}")

    if cfg.steps < 1:
        err("steps", f"must be >= 1, got {cfg.steps}")
    if cfg.max_nonfinite < 1:
        err("max_nonfinite", f"must be >= 1, got {cfg.max_nonfinite}")
    if cfg.model.dtype not in ("bfloat16", "float32", "float16"):
        err("model.dtype", f"must be bfloat16, float16 or float32, got {cfg.model.dtype!r}")
    from contentv_jax.models.attention import KERNEL_CHOICES

    if cfg.model.attention_kernel not in KERNEL_CHOICES:
        err("model.attention_kernel", f"must be one of {KERNEL_CHOICES}, got {cfg.model.attention_kernel!r}")
    b = cfg.buckets
    if (b.max_frames - 1) % VAE_TEMPORAL_FACTOR or b.max_frames < 1:
        err("buckets.max_frames", f"must be 4k+1 (the causal VAE's 1 + 4k frames), got {b.max_frames}")
    unit = VAE_SPATIAL_FACTOR * PATCH_SIZE
    for key, v in (("buckets.max_height", b.max_height), ("buckets.max_width", b.max_width)):
        if v < unit or v % unit:
            err(key, f"must be a positive multiple of {unit} (VAE 8x times patch 2), got {v}")
    if not (b.videos or b.images):
        err("buckets.videos", "at least one of buckets.videos / buckets.images must be true")
    if b.videos and b.max_frames == 1:
        err("buckets.max_frames", "video buckets need max_frames > 1 (set buckets.videos=false for images only)")
    if b.videos and b.batch_video < 1:
        err("buckets.batch_video", f"must be >= 1 when buckets.videos is true, got {b.batch_video}")
    if b.images and b.batch_image < 1:
        err("buckets.batch_image", f"must be >= 1 when buckets.images is true, got {b.batch_image}")
    if not 0.0 <= b.image_fraction <= 1.0:
        err("buckets.image_fraction", f"must be in [0, 1], got {b.image_fraction}")
    if b.images and b.videos and b.image_fraction in (0.0, 1.0):
        err("buckets.image_fraction", "must be strictly between 0 and 1 when both images and videos train")
    if not 0.0 <= cfg.data.caption_dropout <= 1.0:
        err("data.caption_dropout", f"must be in [0, 1], got {cfg.data.caption_dropout}")
    if cfg.model.latent_channels < 0:
        err("model.latent_channels", f"must be >= 0, got {cfg.model.latent_channels}")
    if not cfg.data.dir and cfg.data.synthetic_frames < cfg.buckets.max_frames:
        err("data.synthetic_frames", f"must be >= buckets.max_frames={cfg.buckets.max_frames} for one clip per video")
    if cfg.data.images_per_video < 1:
        err("data.images_per_video", f"must be >= 1, got {cfg.data.images_per_video}")
    if cfg.data.fps <= 0:
        err("data.fps", f"must be > 0, got {cfg.data.fps}")
    o = cfg.optimizer
    if o.lr <= 0:
        err("optimizer.lr", f"must be > 0, got {o.lr}")
    if o.warmup_steps < 0:
        err("optimizer.warmup_steps", f"must be >= 0, got {o.warmup_steps}")
    if o.schedule not in ("constant", "cosine"):
        err("optimizer.schedule", f"must be 'constant' or 'cosine', got {o.schedule!r}")
    if o.schedule == "cosine" and o.decay_steps <= o.warmup_steps:
        err("optimizer.decay_steps", f"cosine needs decay_steps > warmup_steps, got {o.decay_steps}")
    if not 0.0 <= o.ema_decay < 1.0:
        err("optimizer.ema_decay", f"must be in [0, 1), got {o.ema_decay}")
    if o.grad_clip < 0:
        err("optimizer.grad_clip", f"must be >= 0, got {o.grad_clip}")
    if cfg.schedule.logit_std <= 0:
        err("schedule.logit_std", f"must be > 0, got {cfg.schedule.logit_std}")
    if cfg.schedule.flow_shift <= 0:
        err("schedule.flow_shift", f"must be > 0, got {cfg.schedule.flow_shift}")
    if cfg.checkpoint.every < 1:
        err("checkpoint.every", f"must be >= 1, got {cfg.checkpoint.every}")
    if cfg.checkpoint.keep < 1:
        err("checkpoint.keep", f"must be >= 1, got {cfg.checkpoint.keep}")
    if cfg.logging.every < 1:
        err("logging.every", f"must be >= 1, got {cfg.logging.every}")
    for key, v in (("mesh.data", cfg.mesh.data), ("mesh.fsdp", cfg.mesh.fsdp), ("mesh.sequence", cfg.mesh.sequence)):
        if v < 1 and v != -1:
            err(key, f"must be >= 1 or -1, got {v}")
    return cfg


def load_train_config(path=None, overrides=()) -> TrainConfig:
    """Load ``path`` (default ``configs/train/tiny.yaml``), apply ``key=value`` overrides, validate.

    Raises:
      ConfigError: an unknown key or a bad value, named.
      FileNotFoundError: ``path`` does not exist.
    """
    if path is None and DEFAULT_CONFIG.is_file():
        path = DEFAULT_CONFIG
    return validate(load_config(TrainConfig, path, overrides))
