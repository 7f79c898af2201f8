"""The ContentV sampling pipeline: text -> embeddings -> noise -> Euler loop with CFG -> VAE decode -> frames.

Mirrors the official ``ContentVPipeline.__call__`` (github bytedance/ContentV, ``contentv_pipeline.py``,
itself diffusers' ``pipeline_stable_diffusion_3.py`` + ``pipeline_wan.py``):

1. ``num_frames`` is rounded to ``4k + 1`` (with a warning) as the official pipeline does.
2. Text: SD3's three encoders (``contentv_jax.text``), or precomputed embeddings.
3. Initial latents: standard normal of shape ``(B, (F - 1) // 4 + 1, H / 8, W / 8, 16)``; with a seed they are
   drawn with ``torch.Generator().manual_seed(seed)`` in the official ``(B, C, T, H, W)`` layout, so a seed gives
   the same noise as the official demo.
4. Sigmas ``linspace(1, 0, N + 1)[:-1]`` with the flow shift, a final 0 (``contentv_jax.scheduler``).
5. Euler steps ``x <- x + (sigma_next - sigma) * v`` with classifier-free guidance
   ``v = v_uncond + g * (v_cond - v_uncond)``. The official pipeline runs the conditional and unconditional
   passes one after the other; we run both in one batched forward (``[cond ; uncond]`` on the batch axis),
   and the whole loop is one compiled ``lax.fori_loop``. Latents stay float32 between steps (the official
   pipeline keeps them in the transformer's dtype); the transformer sees them in its own dtype.
6. Decode: ``z = z_norm * std + mean`` then the Wan VAE decoder, frames ``clip(x / 2 + 0.5, 0, 1)`` (diffusers'
   ``VideoProcessor.postprocess_video``).

Array layout is channels-last throughout: latents ``(B, T, H, W, C)``, frames ``(B, T, H, W, 3)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from contentv_jax import scheduler as flow
from contentv_jax.sharding.logical import DEFAULT_RULES, activation_sharding

logger = logging.getLogger(__name__)

# The negative prompt of the official demo (bytedance/ContentV ``demo.py``).
DEFAULT_NEGATIVE_PROMPT = (
    "overexposed, low quality, deformation, a poor composition, bad hands, bad teeth, bad eyes, bad limbs, distortion"
)
VAE_TEMPORAL_FACTOR = 4  # Wan2.1: 4 pixel frames per latent frame after the first
VAE_SPATIAL_FACTOR = 8
PATCH_SIZE = 2
SIZE_MULTIPLE = VAE_SPATIAL_FACTOR * PATCH_SIZE  # height and width must be multiples of 16
MAX_SEQUENCE_LENGTH = 256  # ContentV's T5 length

TEXT_SUBFOLDERS = ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")


# ----------------------------------------------------------------------------------------------- shapes and checks
def round_num_frames(num_frames: int, temporal_factor: int = VAE_TEMPORAL_FACTOR) -> int:
    """``num_frames`` rounded down to ``k * temporal_factor + 1`` with a warning, exactly as the official pipeline.

    Raises:
      ValueError: if ``num_frames < 1``.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if num_frames % temporal_factor != 1:
        rounded = num_frames // temporal_factor * temporal_factor + 1
        logger.warning(
            "num_frames - 1 has to be divisible by %d: rounding %d to %d", temporal_factor, num_frames, rounded
        )
        num_frames = rounded
    return max(num_frames, 1)


def check_video_size(height: int, width: int) -> None:
    """Raises ValueError unless height and width are positive multiples of 16 (VAE 8x times patch 2)."""
    for name, value in (("height", height), ("width", width)):
        if value < SIZE_MULTIPLE or value % SIZE_MULTIPLE:
            raise ValueError(
                f"{name} must be a positive multiple of {SIZE_MULTIPLE} (VAE factor {VAE_SPATIAL_FACTOR} x patch "
                f"{PATCH_SIZE}), got {value}"
            )


def latent_shape(batch: int, num_frames: int, height: int, width: int, channels: int = 16) -> tuple[int, ...]:
    """Channels-last latent shape ``(B, (F - 1) // 4 + 1, H // 8, W // 8, C)`` for ``F = 4k + 1`` pixel frames."""
    return (
        batch,
        (num_frames - 1) // VAE_TEMPORAL_FACTOR + 1,
        height // VAE_SPATIAL_FACTOR,
        width // VAE_SPATIAL_FACTOR,
        channels,
    )


def initial_noise(seed: int, shape: Sequence[int]) -> np.ndarray:
    """Standard-normal initial latents, float32, channels-last ``shape = (B, T, H, W, C)``.

    Drawn as the official demo draws them (diffusers ``randn_tensor`` with ``torch.Generator().manual_seed(seed)``
    on the CPU, layout ``(B, C, T, H, W)``), then moved to channels-last, so the same seed gives the same noise.
    """
    import torch

    b, t, h, w, c = shape
    gen = torch.Generator().manual_seed(int(seed))
    noise = torch.randn((b, c, t, h, w), generator=gen, dtype=torch.float32)
    return np.ascontiguousarray(noise.permute(0, 2, 3, 4, 1).numpy())


@dataclasses.dataclass
class PromptEmbeds:
    """Text conditioning as diffusers' SD3 pipeline takes it (float32 NumPy).

    prompt_embeds (B, L, context width), pooled_prompt_embeds (B, pooled width) and, for classifier-free
    guidance, negative_prompt_embeds / negative_pooled_prompt_embeds of the same shapes.
    """

    prompt_embeds: np.ndarray
    pooled_prompt_embeds: np.ndarray
    negative_prompt_embeds: np.ndarray | None = None
    negative_pooled_prompt_embeds: np.ndarray | None = None

    KEYS = ("prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds", "negative_pooled_prompt_embeds")

    @classmethod
    def load(cls, path: str | Path) -> PromptEmbeds:
        """From an ``.npz`` with the keys of :attr:`KEYS` (the negative pair optional).

        Raises:
          ValueError: a missing positive key, an unknown key, or only one of the negative pair.
        """
        with np.load(path) as f:
            data = {k: np.asarray(f[k], np.float32) for k in f.files}
        unknown = sorted(set(data) - set(cls.KEYS))
        if unknown:
            raise ValueError(f"{path}: unknown keys {unknown}; expected {list(cls.KEYS)}")
        missing = [k for k in cls.KEYS[:2] if k not in data]
        if missing:
            raise ValueError(f"{path}: missing keys {missing}; expected {list(cls.KEYS)}")
        if ("negative_prompt_embeds" in data) != ("negative_pooled_prompt_embeds" in data):
            raise ValueError(f"{path}: give both negative_prompt_embeds and negative_pooled_prompt_embeds, or neither")
        return cls(**data)

    @property
    def batch(self) -> int:
        return int(self.prompt_embeds.shape[0])

    def validate(self, context_dim: int, pooled_dim: int, guidance: bool) -> None:
        """Raises ValueError naming the array whose shape does not fit the transformer.

        Args:
          context_dim: the transformer's context width (``joint_attention_dim``, 4096 for ContentV-8B).
          pooled_dim: its pooled width (``pooled_projection_dim``, 2048).
          guidance: whether classifier-free guidance will run (then the negative pair is required).
        """
        pe, pp = self.prompt_embeds, self.pooled_prompt_embeds
        if pe.ndim != 3 or pe.shape[2] != context_dim:
            raise ValueError(f"prompt_embeds must have shape (B, L, {context_dim}), got {pe.shape}")
        if pp.shape != (pe.shape[0], pooled_dim):
            raise ValueError(f"pooled_prompt_embeds must have shape ({pe.shape[0]}, {pooled_dim}), got {pp.shape}")
        if not guidance:
            return
        if self.negative_prompt_embeds is None:
            raise ValueError("guidance_scale > 1 needs negative_prompt_embeds and negative_pooled_prompt_embeds")
        if self.negative_prompt_embeds.shape != pe.shape:
            raise ValueError(
                f"negative_prompt_embeds must have the shape of prompt_embeds {pe.shape}, "
                f"got {self.negative_prompt_embeds.shape}"
            )
        if self.negative_pooled_prompt_embeds.shape != pp.shape:
            raise ValueError(
                f"negative_pooled_prompt_embeds must have the shape of pooled_prompt_embeds {pp.shape}, "
                f"got {self.negative_pooled_prompt_embeds.shape}"
            )

    def repeat(self, n: int) -> PromptEmbeds:
        """Each prompt repeated ``n`` times consecutively (diffusers' ``num_images_per_prompt``)."""
        return PromptEmbeds(*(None if a is None else np.repeat(a, n, axis=0) for a in dataclasses.astuple(self)))


# --------------------------------------------------------------------------------------------- parameter placement
def place_state(state: Any, mesh: Mesh | None, rules=DEFAULT_RULES) -> Any:
    """Put ``state`` on the device(s): sharded by logical names on ``mesh``, else on the default device."""
    if mesh is None:
        return jax.device_put(state)
    from contentv_jax.sharding.init import state_shardings

    return jax.device_put(state, state_shardings(state, mesh, rules))


def to_host(state: Any) -> Any:
    """``state`` as host NumPy arrays (the "parameters kept in host memory until used" switch)."""
    return jax.tree.map(np.asarray, state)


# ------------------------------------------------------------------------------------------------ the Euler loop
_ACTIVE_BAR: list = [None]  # the tqdm bar of the loop now running (one loop at a time per process)


def _progress_callback(step) -> None:
    # Absolute position, never backwards: callbacks may arrive out of order or once per device.
    bar = _ACTIVE_BAR[0]
    if bar is not None:
        bar.n = max(bar.n, int(step) + 1)
        bar.refresh()


@functools.partial(jax.jit, static_argnames=("graphdef", "guidance", "progress", "mesh"), donate_argnames=("latents",))
def _euler_loop(graphdef, state, latents, context, pooled, sigmas, guidance_scale, *, guidance, progress, mesh):
    # ``mesh`` only keys the compilation cache: the trace depends on the active activation_sharding context.
    model = nnx.merge(graphdef, state)
    model_dtype = context.dtype
    num_steps = sigmas.shape[0] - 1

    def step(i, x):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x_in = jnp.concatenate([x, x], axis=0) if guidance else x
        timestep = jnp.full((x_in.shape[0],), sigma * flow.NUM_TRAIN_TIMESTEPS, jnp.float32)
        velocity = model(x_in.astype(model_dtype), timestep, context, pooled).astype(jnp.float32)
        if guidance:
            v_cond, v_uncond = jnp.split(velocity, 2, axis=0)
            velocity = v_uncond + guidance_scale * (v_cond - v_uncond)
        x = x + (sigma_next - sigma) * velocity
        if progress:
            jax.debug.callback(_progress_callback, i)  # unordered: multi-device safe
        return x

    return jax.lax.fori_loop(0, num_steps, step, latents)


def denoise(
    model: nnx.Module,
    latents: jax.Array | np.ndarray,
    embeds: PromptEmbeds,
    sigmas: np.ndarray,
    guidance_scale: float,
    *,
    dtype=None,
    mesh: Mesh | None = None,
    progress: bool = False,
) -> jax.Array:
    """Run the flow-matching Euler loop with classifier-free guidance (one compiled ``fori_loop``).

    Args:
      model: the MM-DiT, called as ``model(latents (B, T, H, W, C), timestep (B,) = sigma * 1000,
        context (B, L, Dctx), pooled (B, Dpool)) -> velocity (B, T, H, W, C)``.
      latents: initial noise, (B, T, H, W, C); float32.
      embeds: text conditioning with batch B (the negative pair needed when ``guidance_scale > 1``).
      sigmas: (N + 1,) float32 schedule from :func:`contentv_jax.scheduler.sampling_sigmas`.
      guidance_scale: CFG weight g; guidance runs when g > 1 (as diffusers' ``do_classifier_free_guidance``).
      dtype: dtype the text context goes in as (None: the model's compute dtype ``model.cfg.dtype``, else
        float32). Parameters are used as they are stored.
      mesh: if given, parameters are sharded by their logical names and activations constrained by
        ``contentv_jax.sharding.logical.DEFAULT_RULES`` (``sequence`` > 1 runs Ulysses attention).
      progress: show a tqdm bar over steps.
    Returns:
      final latents (B, T, H, W, C), float32 (still normalised; see :func:`decode_latents`).
    """
    latents = np.asarray(latents, np.float32) if not isinstance(latents, jax.Array) else latents.astype(jnp.float32)
    if latents.ndim != 5 or latents.shape[0] != embeds.batch:
        raise ValueError(f"latents must be (B={embeds.batch}, T, H, W, C), got {latents.shape}")
    guidance = guidance_scale > 1.0
    if dtype is None:
        dtype = getattr(getattr(model, "cfg", None), "dtype", None) or jnp.float32
    dtype = jnp.dtype(dtype)
    if guidance:
        context = np.concatenate([embeds.prompt_embeds, embeds.negative_prompt_embeds], axis=0)
        pooled = np.concatenate([embeds.pooled_prompt_embeds, embeds.negative_pooled_prompt_embeds], axis=0)
    else:
        context, pooled = embeds.prompt_embeds, embeds.pooled_prompt_embeds
    graphdef, state = nnx.split(model)
    if progress:
        from tqdm.auto import tqdm

        _ACTIVE_BAR[0] = tqdm(total=len(sigmas) - 1, desc="denoising", unit="step")
    try:
        with activation_sharding(mesh) if mesh is not None else contextlib.nullcontext():
            # Parameters go to the device(s) here (a no-op if they are there already in this dtype and layout).
            state = place_state(state, mesh)
            if mesh is not None:
                replicated = NamedSharding(mesh, PartitionSpec())
                latents, context, pooled = jax.device_put((latents, context, pooled), replicated)
            out = _euler_loop(
                graphdef,
                state,
                jnp.asarray(latents, jnp.float32),
                jnp.asarray(context, dtype),
                jnp.asarray(pooled, dtype),
                jnp.asarray(sigmas, jnp.float32),
                jnp.float32(guidance_scale),
                guidance=guidance,
                progress=progress,
                mesh=mesh,
            )
            out = jax.block_until_ready(out)
            if progress:
                jax.effects_barrier()
    finally:
        if _ACTIVE_BAR[0] is not None:
            _ACTIVE_BAR[0].close()
            _ACTIVE_BAR[0] = None
    return out


# ------------------------------------------------------------------------------------------------------ decoding
# diffusers' AutoencoderKLWan.enable_tiling() defaults: 256-pixel tiles every 192 pixels (64 blended).
VAE_TILE_SIZE = (256, 256)
VAE_TILE_STRIDE = (192, 192)


def decode_latents(vae, latents: jax.Array | np.ndarray, *, tiling: bool = False) -> np.ndarray:
    """Normalised latents (B, T, h, w, 16) -> frames (B, 4(T - 1) + 1, 8h, 8w, 3), float32 NumPy in [0, 1].

    ``z = z_norm * std + mean`` (``vae.denormalize``), the Wan VAE decoder (``contentv_jax.models.vae``; chunked
    in time with a causal cache; with ``tiling``, spatial tiles of :data:`VAE_TILE_SIZE` pixels every
    :data:`VAE_TILE_STRIDE`, as diffusers' ``enable_tiling``), then ``clip(x / 2 + 0.5, 0, 1)`` as diffusers'
    ``VideoProcessor.postprocess_video``. The VAE runs in float32, as in the official demo.
    """
    z = vae.denormalize(jnp.asarray(latents, jnp.float32))
    tiles = dict(tile_sample_size=VAE_TILE_SIZE, tile_sample_stride=VAE_TILE_STRIDE) if tiling else {}
    video = vae.decode(z, **tiles)
    return np.asarray(jnp.clip(video.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0))


# ------------------------------------------------------------------------------------------------- the pipeline
def _read_json(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


def transformer_dims(transformer_dir: str | Path) -> dict[str, int]:
    """``in_channels``, ``context_dim`` and ``pooled_dim`` of a transformer checkpoint, from its ``config.json``.

    Diffusers' directories and our checkpoints use the same keys (``in_channels``, ``joint_attention_dim``,
    ``pooled_projection_dim``). Raises FileNotFoundError / ValueError if the config is missing or lacks them.
    """
    path = Path(transformer_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: not a transformer checkpoint")
    cfg = _read_json(path)
    keys = {
        "in_channels": ("in_channels",),
        "context_dim": ("joint_attention_dim",),
        "pooled_dim": ("pooled_projection_dim",),
    }
    out = {}
    for name, candidates in keys.items():
        hit = next((cfg[c] for c in candidates if c in cfg), None)
        if hit is None:
            raise ValueError(f"{transformer_dir}/config.json has none of {candidates}")
        out[name] = int(hit)
    return out


@dataclasses.dataclass
class SamplingOptions:
    """What one call of :class:`ContentVPipeline` generates (official defaults)."""

    num_frames: int = 125
    height: int = 432
    width: int = 768
    num_steps: int = 50
    guidance_scale: float = 6.0
    shift: float | None = None  # None: the model directory's scheduler config, else 17
    max_sequence_length: int = MAX_SEQUENCE_LENGTH


class ContentVPipeline:
    """Text -> video with a ContentV checkpoint directory (diffusers layout or our converted one).

    ``model_dir`` holds ``transformer/``, ``vae/``, optionally ``scheduler/scheduler_config.json`` (the flow
    shift) and, unless prompt embeddings are given, ``text_encoder{,_2,_3}/`` and ``tokenizer{,_2,_3}/``.
    """

    def __init__(
        self,
        transformer: nnx.Module,
        vae=None,
        text_encoders=None,
        *,
        shift: float = flow.DEFAULT_SAMPLING_SHIFT,
        context_dim: int,
        pooled_dim: int,
        in_channels: int = 16,
        mesh: Mesh | None = None,
        vae_tiling: bool = False,
        offload: bool = False,
    ):
        self.transformer = transformer
        self.vae = vae
        self.text_encoders = text_encoders
        self.shift = float(shift)
        self.context_dim, self.pooled_dim, self.in_channels = context_dim, pooled_dim, in_channels
        self.mesh = mesh
        self.vae_tiling = vae_tiling
        self.offload = offload
        if offload:
            # Parameters live in host memory; each part goes to the device only while it runs.
            nnx.update(transformer, to_host(nnx.state(transformer)))
            if vae is not None:
                nnx.update(vae, to_host(nnx.state(vae)))

    @staticmethod
    def check_model_dir(model_dir: str | Path, *, need_text: bool = True, need_vae: bool = True) -> None:
        """Raises FileNotFoundError naming every missing sub-folder of ``model_dir``."""
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise FileNotFoundError(f"model directory {model_dir} does not exist")
        needed = ["transformer"] + (["vae"] if need_vae else []) + (list(TEXT_SUBFOLDERS) if need_text else [])
        missing = [d for d in needed if not (model_dir / d).is_dir()]
        if missing:
            raise FileNotFoundError(
                f"model directory {model_dir} lacks sub-folder(s) {missing} "
                f"(a ContentV directory has transformer/, vae/, scheduler/, text_encoder{{,_2,_3}}/, tokenizer{{,_2,_3}}/)"
            )

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        *,
        load_text_encoders: bool = True,
        load_vae: bool = True,
        shift: float | None = None,
        dtype=None,
        mesh: Mesh | None = None,
        attention_kernel: str | None = None,
        vae_tiling: bool = False,
        offload: bool = False,
    ) -> ContentVPipeline:
        """Load the parts of ``model_dir`` (checked first: missing sub-folders raise FileNotFoundError).

        Args:
          shift: flow shift; None reads ``scheduler/scheduler_config.json``, else 17 (report section 4).
          dtype: transformer dtype name, for its parameters and matmuls (None: float32; the official demo uses
            "bfloat16"). The VAE runs in float32, as in the official demo.
          attention_kernel: one of ``contentv_jax.models.attention.KERNELS`` (``chunked`` for long videos).
          mesh: sample sharded on this mesh (parameters by logical names; ``sequence`` > 1: Ulysses attention).
          vae_tiling: decode in spatial tiles.
          offload: keep parameters in host memory; each model goes to the device only while it runs.
        """
        model_dir = Path(model_dir)
        cls.check_model_dir(model_dir, need_text=load_text_encoders, need_vae=load_vae)
        if shift is None:
            shift = flow.scheduler_shift(model_dir / "scheduler" / "scheduler_config.json")
        dims = transformer_dims(model_dir / "transformer")
        from contentv_jax.checkpoints import load_transformer

        overrides = {} if attention_kernel is None else {"attention_kernel": attention_kernel}
        transformer = load_transformer(model_dir / "transformer", dtype=dtype, param_dtype=dtype, **overrides)
        vae = None
        if load_vae:
            from contentv_jax.checkpoints import load_vae as _load_vae

            vae = _load_vae(model_dir / "vae")
        text = None
        if load_text_encoders:
            from contentv_jax.text import TextEncoders

            text = TextEncoders.from_pretrained(model_dir)
        return cls(
            transformer,
            vae,
            text,
            shift=shift,
            mesh=mesh,
            vae_tiling=vae_tiling,
            offload=offload,
            **dims,
        )

    # -------------------------------------------------------------------------------------------------------
    def encode_prompt(
        self,
        prompts: Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        *,
        guidance: bool = True,
        max_sequence_length: int = MAX_SEQUENCE_LENGTH,
    ) -> PromptEmbeds:
        """SD3 text encoding of ``prompts`` and (for guidance) the negative prompt (official default if None)."""
        if self.text_encoders is None:
            raise ValueError("this pipeline has no text encoders: pass prompt embeddings instead of prompts")
        prompts = list(prompts)
        pe, pp = self.text_encoders.encode(prompts, max_sequence_length=max_sequence_length)
        embeds = PromptEmbeds(_np32(pe), _np32(pp))
        if guidance:
            negative = DEFAULT_NEGATIVE_PROMPT if negative_prompt is None else negative_prompt
            negative = [negative] * len(prompts) if isinstance(negative, str) else list(negative)
            if len(negative) != len(prompts):
                raise ValueError(f"{len(negative)} negative prompts for {len(prompts)} prompts")
            ne, npool = self.text_encoders.encode(negative, max_sequence_length=max_sequence_length)
            embeds.negative_prompt_embeds, embeds.negative_pooled_prompt_embeds = _np32(ne), _np32(npool)
        return embeds

    def __call__(
        self,
        prompts: str | Sequence[str] | None = None,
        *,
        negative_prompt: str | Sequence[str] | None = None,
        embeds: PromptEmbeds | None = None,
        options: SamplingOptions | None = None,
        videos_per_prompt: int = 1,
        seed: int = 0,
        latents: np.ndarray | None = None,
        output_type: str = "frames",
        progress: bool = False,
    ) -> np.ndarray:
        """Generate videos.

        Args:
          prompts: a prompt or a list of them (or ``embeds`` instead).
          negative_prompt: used when ``options.guidance_scale > 1``; the official default when None.
          embeds: precomputed :class:`PromptEmbeds` (batch B); then no text encoder runs.
          videos_per_prompt: videos per prompt (consecutive in the batch).
          seed: seed of the initial noise (see :func:`initial_noise`); ignored when ``latents`` is given.
          latents: initial noise (B * videos_per_prompt, T, H/8, W/8, C), float32.
          output_type: ``"frames"`` (float32 (B, F, H, W, 3) in [0, 1]) or ``"latent"`` (normalised latents).
        Raises:
          ValueError: bad size, frame count, output type, embedding or latent shapes (all before any compute).
        """
        opts = options or SamplingOptions()
        if output_type not in ("frames", "latent"):
            raise ValueError(f"output_type must be 'frames' or 'latent', got {output_type!r}")
        check_video_size(opts.height, opts.width)
        num_frames = round_num_frames(opts.num_frames)
        if videos_per_prompt < 1:
            raise ValueError(f"videos_per_prompt must be >= 1, got {videos_per_prompt}")
        if opts.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {opts.num_steps}")
        if output_type == "frames" and self.vae is None:
            raise ValueError("output_type 'frames' needs a VAE")
        guidance = opts.guidance_scale > 1.0
        if embeds is None:
            if prompts is None:
                raise ValueError("give prompts or embeds")
            prompts = [prompts] if isinstance(prompts, str) else list(prompts)
            if self.text_encoders is None:
                raise ValueError("this pipeline has no text encoders: pass embeds")
        else:
            embeds.validate(self.context_dim, self.pooled_dim, guidance)
        batch = (len(prompts) if embeds is None else embeds.batch) * videos_per_prompt
        shape = latent_shape(batch, num_frames, opts.height, opts.width, self.in_channels)
        if latents is not None:
            latents = np.asarray(latents, np.float32)
            if latents.shape != shape:
                raise ValueError(
                    f"latents must have shape {shape} for {num_frames} frames of {opts.height}x{opts.width}, "
                    f"got {latents.shape}"
                )
        if embeds is None:
            embeds = self.encode_prompt(
                prompts, negative_prompt, guidance=guidance, max_sequence_length=opts.max_sequence_length
            )
            embeds.validate(self.context_dim, self.pooled_dim, guidance)
        embeds = embeds.repeat(videos_per_prompt)
        if latents is None:
            latents = initial_noise(seed, shape)
        shift = self.shift if opts.shift is None else opts.shift
        sigmas = flow.sampling_sigmas(opts.num_steps, shift)
        out = denoise(
            self.transformer,
            latents,
            embeds,
            sigmas,
            opts.guidance_scale,
            mesh=self.mesh,
            progress=progress,
        )
        if output_type == "latent":
            return np.asarray(out)
        vae = self.vae
        if self.offload:
            graphdef, state = nnx.split(vae)
            vae = nnx.merge(graphdef, jax.device_put(state))
        return decode_latents(vae, out, tiling=self.vae_tiling)


def _np32(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, np.float32)

