"""The training config: nested dataclasses, filled from ``configs/train/*.yaml`` and ``key=value`` overrides.

The dataclasses hold every default (the tiny CPU run); a stage YAML lists only what differs from them,
or from the stage it names as ``base:``. Loaded with :func:`contentv_jax.config.load_config` (unknown
keys are errors naming the dotted key).
:func:`validate` then checks shapes and values before any work (an impossible shape names its key).
Stage configs follow ContentV report (arXiv 2506.05343), section 5.3, Table 2.
"""

from __future__ import annotations

import dataclasses

from contentv_jax.config import ConfigError, find_config, load_config
from contentv_jax.dtypes import NAMES as DTYPE_NAMES
from contentv_jax.sharding.mesh import MeshConfig
from contentv_jax.train.rlhf import RLHFSection, validate_rlhf

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
    model config (empty keeps the model default). ``latent_channels``: the transformer's in/out
    channels, the VAE's latent channels (16 for the Wan2.1 VAE, ContentV report section 4.1; 0 keeps the
    named config's ``in_channels``).
    ``attention_kernel``: ``auto`` (cuDNN flash on GPU,
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
    latent_channels: int = 16


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
    count and frames per video (at ``fps``). ``num_threads``: grain read threads. ``encode_workers``: the
    encode stage's decode threads (0: its stages one after another; ``encode_dataset``'s
    ``decode_workers``), ``encode_batch_size``: clips per VAE call (one bucket). ``images_per_video``:
    an image-only stage (``buckets.max_frames`` 1) takes this many evenly spread frames per video.
    ``caption_weights``: with several captions per clip (``captions.jsonl``'s ``captions`` list,
    ``short_caption``, ``long_caption``), the draw weight of each kind (``caption``, ``short``, ``long``),
    e.g. ``{short: 0.5, long: 0.5}`` as in the report's SFT (section 6.1); empty: every caption equally
    likely. One draw per sample per step from the seed and the step (the same on every host and on resume).
    ``filter``: a curated subset by the numeric fields of ``captions.jsonl`` lines, ``{field: {min, max,
    top, bottom}}`` (``top``/``bottom`` are fractions of the whole dataset), e.g. the report's SFT subset
    ``{aesthetic: {top: 0.1}, motion: {top: 0.1}}``; applied when the records are loaded.
    """

    dir: str = ""
    cache_dir: str = ""
    fps: float = 8.0
    caption_dropout: float = 0.1
    num_synthetic: int = 16
    synthetic_frames: int = 24
    num_threads: int = 2
    encode_workers: int = 2
    encode_batch_size: int = 1
    images_per_video: int = 1
    caption_weights: dict[str, float] = dataclasses.field(default_factory=dict)
    filter: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)


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
    """Metrics every ``every`` steps to TensorBoard (``tensorboard``) and ``metrics.jsonl``; tqdm bar.

    ``sample_every``: every that many steps (0: never) sample the ``sampling`` section's prompts with the weights
    the run would export (the EMA when enabled), write the mp4s under ``<run_dir>/samples/<step>/`` and log a
    frame grid and the clips to TensorBoard (``samples/...``).
    """

    every: int = 1
    tensorboard: bool = True
    progress_bar: bool = True
    sample_every: int = 0


DEFAULT_SAMPLE_PROMPTS = ("a red circle moving right on a blue background", "a small green square moving up on a black background")


@dataclasses.dataclass
class SamplingSection:
    """How the trained model samples: the flow ``shift`` written to ``<run_dir>/pipeline/scheduler/
    scheduler_config.json`` (17, the report's sampling shift: ContentV report (arXiv 2506.05343), section 5.1,
    "Flow Shift") and the previews ``logging.sample_every`` draws: ``prompts`` against ``negative_prompt``
    (the empty prompt by default: what caption dropout trains as the unconditional branch), ``steps`` Euler
    steps at ``guidance_scale``, ``num_frames`` x ``height`` x ``width`` pixels (0: the largest bucket,
    ``buckets.max_*``), noise from ``seed``, written at ``fps`` (0: ``data.fps``).
    """

    shift: float = 17.0
    prompts: list[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_SAMPLE_PROMPTS))
    negative_prompt: str = ""
    steps: int = 20
    guidance_scale: float = 6.0
    num_frames: int = 0
    height: int = 0
    width: int = 0
    seed: int = 0
    fps: float = 0.0


@dataclasses.dataclass
class RewardSection:
    """The reward of ``mode: rlhf`` (``contentv_jax.models.reward``).

    ``name``: ``clip`` | ``pickscore`` | ``mps`` | ``hps`` | ``analytic``. ``path``: its checkpoint (HF / open_clip /
    MPS state dict, or ours); empty with ``clip``: a tiny random CLIP (``tiny_clip``-sized) is built, saved to
    ``<run_dir>/assets/reward`` and reloaded through ``load_reward``. ``target``: the analytic reward's RGB target.
    ``monitor_name`` / ``monitor_path``: an optional second reward logged on the held-out prompts only (a
    reward-hacking monitor); empty: none.
    """

    name: str = "analytic"
    path: str = ""
    target: list[float] = dataclasses.field(default_factory=lambda: [1.0, 0.5, 0.0])
    monitor_name: str = ""
    monitor_path: str = ""


@dataclasses.dataclass
class SFTSection:
    """Supervised fine-tuning (ContentV report section 6.1): ``kl_weight`` (lambda) of the velocity
    regulariser ``lambda * mean((v - sg(v_ref))^2)`` against the frozen pre-trained model (``model.init``,
    kept in bfloat16, sharded like the trained model, never updated nor saved); 0 disables it
    (:mod:`contentv_jax.train.sft`)."""

    kl_weight: float = 0.0


@dataclasses.dataclass
class TrainConfig:
    """Everything a training run needs (``python -m contentv_jax.train``)."""

    run_dir: str = "runs/tiny"
    mode: str = "flow_matching"
    prompts: str = ""
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
    sampling: SamplingSection = dataclasses.field(default_factory=SamplingSection)
    rlhf: RLHFSection = dataclasses.field(default_factory=RLHFSection)
    reward: RewardSection = dataclasses.field(default_factory=RewardSection)
    sft: SFTSection = dataclasses.field(default_factory=SFTSection)


DEFAULT_CONFIG = "tiny"  # the shipped configs/train/tiny.yaml (contentv_jax.config.find_config)


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
    if cfg.mode not in ("flow_matching", "rlhf"):
        err("mode", f"must be 'flow_matching' or 'rlhf', got {cfg.mode!r}")
    if cfg.mode == "rlhf":
        validate_rlhf(cfg.rlhf)
        if cfg.reward.name not in ("clip", "pickscore", "mps", "hps", "analytic"):
            err("reward.name", f"must be one of clip, pickscore, mps, hps, analytic, got {cfg.reward.name!r}")
        if cfg.reward.name not in ("clip", "analytic") and not cfg.reward.path:
            err("reward.path", f"reward {cfg.reward.name!r} needs a checkpoint path")
    if cfg.max_nonfinite < 1:
        err("max_nonfinite", f"must be >= 1, got {cfg.max_nonfinite}")
    if cfg.model.dtype not in DTYPE_NAMES:
        err("model.dtype", f"must be one of {', '.join(DTYPE_NAMES)}, got {cfg.model.dtype!r}")
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
    if cfg.data.encode_workers < 0:
        err("data.encode_workers", f"must be >= 0, got {cfg.data.encode_workers}")
    if cfg.data.encode_batch_size < 1:
        err("data.encode_batch_size", f"must be >= 1, got {cfg.data.encode_batch_size}")
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
    try:
        cfg.mesh.logical_rules()
    except ValueError as e:
        err("mesh.rules", str(e))
    if cfg.logging.sample_every < 0:
        err("logging.sample_every", f"must be >= 0 (0: no samples), got {cfg.logging.sample_every}")
    sm = cfg.sampling
    if sm.shift <= 0:
        err("sampling.shift", f"must be > 0, got {sm.shift}")
    if cfg.logging.sample_every:
        if not sm.prompts or not all(isinstance(q, str) and q.strip() for q in sm.prompts):
            err("sampling.prompts", f"must be a non-empty list of non-empty prompts when logging.sample_every > 0, got {sm.prompts!r}")
        if sm.steps < 1:
            err("sampling.steps", f"must be >= 1, got {sm.steps}")
        if sm.num_frames and (sm.num_frames - 1) % VAE_TEMPORAL_FACTOR:
            err("sampling.num_frames", f"must be 4k+1 (or 0: buckets.max_frames), got {sm.num_frames}")
        for key, v in (("sampling.height", sm.height), ("sampling.width", sm.width)):
            if v and (v < unit or v % unit):
                err(key, f"must be a positive multiple of {unit} (or 0: the largest bucket), got {v}")
        if sm.fps < 0:
            err("sampling.fps", f"must be >= 0 (0: data.fps), got {sm.fps}")
    if cfg.sft.kl_weight < 0:
        err("sft.kl_weight", f"must be >= 0, got {cfg.sft.kl_weight}")
    if cfg.sft.kl_weight > 0 and cfg.model.init == "random":
        err("sft.kl_weight", f"{cfg.sft.kl_weight} > 0 needs a pre-trained model to stay close to, but "
            "model.init is 'random': set model.init to a checkpoint or sft.kl_weight=0")
    from contentv_jax.data.curation import validate_caption_weights, validate_filter

    validate_caption_weights(cfg.data.caption_weights)
    validate_filter(cfg.data.filter)
    for key, v in (("mesh.data", cfg.mesh.data), ("mesh.fsdp", cfg.mesh.fsdp), ("mesh.sequence", cfg.mesh.sequence)):
        if v < 1 and v != -1:
            err(key, f"must be >= 1 or -1, got {v}")
    return cfg


def load_train_config(path=None, overrides=()) -> TrainConfig:
    """Load ``path`` (default: the shipped ``configs/train/tiny.yaml``), apply ``key=value`` overrides, validate.

    ``path`` is a file, or the name of a shipped config (``stage3``, ``configs/train/stage3.yaml``; see
    :func:`contentv_jax.config.find_config`), so that an installed package runs from any directory.

    Raises:
      ConfigError: an unknown key or a bad value, named; or a config file that cannot be found (never a
        silent fall back to the dataclass defaults), naming every path looked at.
    """
    try:
        path = find_config(DEFAULT_CONFIG if path is None else path, "train")
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    return validate(load_config(TrainConfig, path, overrides))
