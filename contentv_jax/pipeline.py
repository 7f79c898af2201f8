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
import os
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

    def as_kwargs(self) -> dict[str, np.ndarray | None]:
        """The four arrays as :meth:`ContentVPipeline.__call__` keyword arguments."""
        return {k: getattr(self, k) for k in self.KEYS}

    def repeat(self, n: int) -> PromptEmbeds:
        """Each prompt repeated ``n`` times consecutively (diffusers' ``num_images_per_prompt``)."""
        return PromptEmbeds(*(None if a is None else np.repeat(a, n, axis=0) for a in dataclasses.astuple(self)))


# --------------------------------------------------------------------------------------------- parameter placement
def place_state(state: Any, mesh: Mesh | None, rules=DEFAULT_RULES) -> Any:
    """Put ``state`` on the device(s): sharded by logical names on ``mesh``, else on the default device.

    Leaves in a host memory kind (:func:`to_host_memory`) are copied into device memory; leaves already in
    device memory are left as they are.
    """
    if mesh is None:
        return jax.device_put(jax.tree.map(_in_device_memory, state))
    from contentv_jax.sharding.init import state_shardings

    return jax.device_put(state, state_shardings(state, mesh, rules))


def to_host(state: Any) -> Any:
    """``state`` as host NumPy arrays (the "parameters kept in host memory until used" switch)."""
    return jax.tree.map(np.asarray, state)


# Memory switches of the pipeline (the web UI's and the CLI's ``offload``):
#   none:       every model stays in device memory;
#   model:      parameters live in host memory; a model's parameters go to the device only while it runs
#               (the transformer during denoising, the VAE during decoding), as diffusers'
#               ``enable_model_cpu_offload``;
#   sequential: as ``model``, and during denoising the stacked joint blocks stream from host memory one
#               block at a time (only one block's parameters plus the non-block ones on the device), as
#               diffusers' ``enable_sequential_cpu_offload``; slower (one dispatch and transfer per block).
OFFLOAD_MODES = ("none", "model", "sequential")
HOST_MEMORY_KIND = "pinned_host"


def offload_mode(offload: bool | str | None) -> str:
    """``offload`` as one of :data:`OFFLOAD_MODES` (``True`` is ``"model"``, ``False``/None ``"none"``).

    Raises:
      ValueError: any other value.
    """
    if offload is None or offload is False:
        return "none"
    if offload is True:
        return "model"
    if offload in OFFLOAD_MODES:
        return offload
    raise ValueError(f"offload must be one of {OFFLOAD_MODES} (or a bool), got {offload!r}")


def _has_memory(device, kind: str) -> bool:
    try:
        return any(m.kind == kind for m in device.addressable_memories())
    except Exception:  # backends without memory spaces
        return False


def _in_device_memory(x):
    if isinstance(x, jax.Array) and x.sharding.memory_kind not in (None, "device"):
        return jax.device_put(x, x.sharding.with_memory_kind("device"))
    return x


def to_host_memory(state: Any) -> Any:
    """``state``'s arrays moved to host memory: the ``pinned_host`` memory kind of their own devices (same
    sharding), or host NumPy arrays where the backend has no pinned host memory. :func:`place_state` brings
    them back into device memory."""

    def put(x):
        if isinstance(x, jax.Array):
            devices = x.sharding.device_set
            if all(_has_memory(d, HOST_MEMORY_KIND) for d in devices):
                return jax.device_put(x, x.sharding.with_memory_kind(HOST_MEMORY_KIND))
            return np.asarray(x)
        device = jax.devices()[0]
        if _has_memory(device, HOST_MEMORY_KIND):
            return jax.device_put(x, jax.sharding.SingleDeviceSharding(device, memory_kind=HOST_MEMORY_KIND))
        return np.asarray(x)

    return jax.tree.map(put, state)


def memory_kind_bytes(state: Any) -> dict[str, int]:
    """Bytes of ``state``'s arrays per memory kind (``"device"``, ``"pinned_host"``, ``"numpy"`` for host
    NumPy arrays). Arrays sharded over several devices count their global size once."""
    out: dict[str, int] = {}
    for x in jax.tree.leaves(state):
        kind = (x.sharding.memory_kind or "device") if isinstance(x, jax.Array) else "numpy"
        out[kind] = out.get(kind, 0) + int(np.dtype(x.dtype).itemsize * np.prod(x.shape))
    return out


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


def _denoise_inputs(model, latents, embeds: PromptEmbeds, guidance_scale: float, dtype):
    """The checks and inputs shared by :func:`denoise` and the sequential-offload loop: latents as float32
    (a jax.Array stays on its device), whether CFG runs (``guidance_scale > 1``), the compute dtype (default the
    model's ``config.dtype``), and the text context / pooled embeddings, conditional rows then unconditional ones
    under CFG. Raises ValueError for latents that are not ``(B, T, H, W, C)`` with the embeddings' batch."""
    latents = np.asarray(latents, np.float32) if not isinstance(latents, jax.Array) else latents.astype(jnp.float32)
    if latents.ndim != 5 or latents.shape[0] != embeds.batch:
        raise ValueError(f"latents must be (B={embeds.batch}, T, H, W, C), got {latents.shape}")
    guidance = guidance_scale > 1.0
    if dtype is None:
        dtype = getattr(getattr(model, "config", None), "dtype", None) or jnp.float32
    if guidance:
        context = np.concatenate([embeds.prompt_embeds, embeds.negative_prompt_embeds], axis=0)
        pooled = np.concatenate([embeds.pooled_prompt_embeds, embeds.negative_pooled_prompt_embeds], axis=0)
    else:
        context, pooled = embeds.prompt_embeds, embeds.pooled_prompt_embeds
    return latents, guidance, jnp.dtype(dtype), context, pooled


def denoise(
    model: nnx.Module,
    latents: jax.Array | np.ndarray,
    embeds: PromptEmbeds,
    sigmas: np.ndarray,
    guidance_scale: float,
    *,
    dtype=None,
    mesh: Mesh | None = None,
    progress: bool | dict = False,
) -> jax.Array:
    """Run the flow-matching Euler loop with classifier-free guidance (one compiled ``fori_loop``).

    Args:
      model: the MM-DiT, called as ``model(latents (B, T, H, W, C), timestep (B,) = sigma * 1000,
        context (B, L, Dctx), pooled (B, Dpool)) -> velocity (B, T, H, W, C)``.
      latents: initial noise, (B, T, H, W, C); float32.
      embeds: text conditioning with batch B (the negative pair needed when ``guidance_scale > 1``).
      sigmas: (N + 1,) float32 schedule from :func:`contentv_jax.scheduler.sampling_sigmas`.
      guidance_scale: CFG weight g; guidance runs when g > 1 (as diffusers' ``do_classifier_free_guidance``).
      dtype: dtype the text context goes in as (None: the model's compute dtype ``model.config.dtype``, else
        float32). Parameters are used as they are stored.
      mesh: if given, parameters are sharded by their logical names and activations constrained by
        ``contentv_jax.sharding.logical.DEFAULT_RULES`` (``sequence`` > 1 runs Ulysses attention).
      progress: show a tqdm bar over steps (a dict: tqdm options of the bar).
    Returns:
      final latents (B, T, H, W, C), float32 (still normalised; see :func:`decode_latents`).
    """
    latents, guidance, dtype, context, pooled = _denoise_inputs(model, latents, embeds, guidance_scale, dtype)
    graphdef, state = nnx.split(model)
    if progress:
        from tqdm.auto import tqdm

        bar_kwargs = {"desc": "denoising", "unit": "step"} | (progress if isinstance(progress, dict) else {})
        _ACTIVE_BAR[0] = tqdm(total=len(sigmas) - 1, **bar_kwargs)
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
                progress=bool(progress),
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


# ----------------------------------------------------------------------------- sequential (block-streamed) loop
@functools.partial(jax.jit, static_argnames=("graphdef", "guidance"))
def _seq_embed(graphdef, state, x, sigma, context, pooled, *, guidance):
    view = nnx.merge(graphdef, state)
    x_in = jnp.concatenate([x, x], axis=0) if guidance else x
    timestep = jnp.full((x_in.shape[0],), sigma * flow.NUM_TRAIN_TIMESTEPS, jnp.float32)
    return view.embed(x_in.astype(context.dtype), timestep, context, pooled)


@functools.partial(jax.jit, static_argnames=("graphdef", "n_tok"))
def _seq_block(graphdef, layer_state, x, c, temb, *, n_tok):
    from contentv_jax.models.transformer import MMDiT

    return MMDiT.block_step(nnx.merge(graphdef, layer_state), x, c, temb, n_tok)


@functools.partial(jax.jit, static_argnames=("graphdef", "latent_shape", "guidance"))
def _seq_head(graphdef, state, x, c, temb, latents, sigma, sigma_next, guidance_scale, *, latent_shape, guidance):
    view = nnx.merge(graphdef, state)
    velocity = view.head(x, c, temb, latent_shape).astype(jnp.float32)
    if guidance:
        v_cond, v_uncond = jnp.split(velocity, 2, axis=0)
        velocity = v_uncond + guidance_scale * (v_cond - v_uncond)
    return latents + (sigma_next - sigma) * velocity


def _fetch_layer(stacked: Any, index: int, device) -> Any:
    """Layer ``index`` of the stacked block state, copied into ``device``'s memory (only that slice moves)."""
    if all(isinstance(a, jax.Array) for a in jax.tree.leaves(stacked)):
        return _fetch_slice(stacked, np.int32(index))
    target = jax.sharding.SingleDeviceSharding(device, memory_kind="device")
    return jax.device_put(jax.tree.map(lambda a: np.asarray(a)[index], stacked), target)


@jax.jit
def _fetch_slice(tree, index):
    # The slice is taken where the stacked arrays live (host memory), then only it moves to the device.
    take = lambda a: jax.device_put(jax.lax.dynamic_index_in_dim(a, index, keepdims=False), jax.memory.Space.Device)
    return jax.tree.map(take, tree)


def denoise_sequential(
    model: nnx.Module,
    latents: jax.Array | np.ndarray,
    embeds: PromptEmbeds,
    sigmas: np.ndarray,
    guidance_scale: float,
    *,
    dtype=None,
    progress: bool = False,
    on_block=None,
) -> jax.Array:
    """:func:`denoise` with the stacked joint blocks streamed from host memory one block at a time.

    Same arguments, result and numerics as :func:`denoise` (one device, no mesh). Per step: the embedding
    (``MMDiT.embed``), then for each stacked block its parameters are copied from host memory into device
    memory, the block runs, and the copy is dropped; then ``MMDiT.head`` and the guided Euler update. Only
    one block's parameters plus the non-block ones (``transformer.NON_BLOCK_MODULES``) are on the device at a
    time; the stacked state may sit in ``pinned_host`` memory (:func:`to_host_memory`) or NumPy. Mirrors
    diffusers' ``enable_sequential_cpu_offload`` (accelerate's per-module hooks), block-wise.

    Args:
      on_block: optional ``on_block(step, layer)`` called after each block ran, while that block's
        parameters are still on the device (for memory monitoring).
    Returns:
      final latents (B, T, H, W, C), float32.
    """
    from contentv_jax.models.transformer import MMDiT, NonBlockView

    latents, guidance, dtype, context, pooled = _denoise_inputs(model, latents, embeds, guidance_scale, dtype)
    latents = jnp.asarray(latents)
    device = jax.devices()[0]
    view_def, view_state = nnx.split(NonBlockView(model))
    view_state = place_state(view_state, None)  # non-block parameters: on the device for the whole loop
    stacked_def = stacked = None
    if model.transformer_blocks is not None:
        stacked_def, stacked = nnx.split(model.transformer_blocks)
    num_layers = 0 if stacked is None else int(jax.tree.leaves(stacked)[0].shape[0])
    context, pooled = jnp.asarray(context, dtype), jnp.asarray(pooled, dtype)
    sigmas = np.asarray(sigmas, np.float32)
    n_tok = MMDiT.num_video_tokens(model, latents.shape)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(sigmas) - 1, desc="denoising (sequential offload)", unit="step")
    try:
        for i in range(len(sigmas) - 1):
            sigma, sigma_next = jnp.float32(sigmas[i]), jnp.float32(sigmas[i + 1])
            x, c, temb = _seq_embed(view_def, view_state, latents, sigma, context, pooled, guidance=guidance)
            for layer in range(num_layers):
                layer_state = _fetch_layer(stacked, layer, device)
                x, c = _seq_block(stacked_def, layer_state, x, c, temb, n_tok=n_tok)
                if on_block is not None:
                    jax.block_until_ready(x)
                    on_block(i, layer)
                del layer_state  # the device copy goes as soon as the block has run
            latents = _seq_head(
                view_def, view_state, x, c, temb, latents, sigma, sigma_next, jnp.float32(guidance_scale),
                latent_shape=tuple(latents.shape) if not guidance else (2 * latents.shape[0], *latents.shape[1:]),
                guidance=guidance,
            )
            if bar is not None:
                jax.block_until_ready(latents)
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return jax.block_until_ready(latents)


# ------------------------------------------------------------------------------------------------------ decoding
# diffusers' AutoencoderKLWan.enable_tiling() defaults: 256-pixel tiles every 192 pixels (64 blended).
VAE_TILE_SIZE = (256, 256)
VAE_TILE_STRIDE = (192, 192)


def decode_latents(vae, latents: jax.Array | np.ndarray, *, tiling: bool = False, slicing: bool = False) -> np.ndarray:
    """Normalised latents (B, T, h, w, 16) -> frames (B, 4(T - 1) + 1, 8h, 8w, 3), float32 NumPy in [0, 1].

    ``z = z_norm * std + mean`` (``vae.denormalize``), the Wan VAE decoder (``contentv_jax.models.vae``; chunked
    in time with a causal cache; with ``tiling``, spatial tiles of :data:`VAE_TILE_SIZE` pixels every
    :data:`VAE_TILE_STRIDE`, as diffusers' ``enable_tiling``), then ``clip(x / 2 + 0.5, 0, 1)`` as diffusers'
    ``VideoProcessor.postprocess_video``. The VAE runs in float32, as in the official demo. With ``slicing``
    the videos of the batch are decoded one at a time (diffusers' ``enable_slicing``): the decoder's peak
    memory is that of one video, the result is the same.
    """
    if slicing and len(latents) > 1:
        return np.concatenate([decode_latents(vae, latents[i : i + 1], tiling=tiling) for i in range(len(latents))])
    z = vae.denormalize(jnp.asarray(latents, jnp.float32))
    tiles = dict(tile_sample_size=VAE_TILE_SIZE, tile_sample_stride=VAE_TILE_STRIDE) if tiling else {}
    video = vae.decode(z, **tiles)
    return np.asarray(jnp.clip(video.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0))


# ------------------------------------------------------------------------------------------------- the pipeline
def _read_json(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


def transformer_dims(transformer_dir: str | Path) -> dict[str, int]:
    """``in_channels``, ``context_dim`` and ``pooled_dim`` of a transformer checkpoint, from its ``config.json``
    (``transformer_dir`` may also be the JSON file itself, e.g. a run's ``model_config.json``).

    Diffusers' directories and our checkpoints use the same keys (``in_channels``, ``joint_attention_dim``,
    ``pooled_projection_dim``). Raises FileNotFoundError / ValueError if the config is missing or lacks them.
    """
    path = Path(transformer_dir)
    path = path if path.suffix == ".json" else path / "config.json"
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
    """What one call of :class:`ContentVPipeline` generates (official defaults), under our older names.

    ``pipe(prompt, **opts.as_kwargs())`` is ``pipe(prompt, num_frames=..., num_inference_steps=..., ...)``.
    """

    num_frames: int = 125
    height: int = 432
    width: int = 768
    num_steps: int = 50
    guidance_scale: float = 6.0
    shift: float | None = None  # None: the model directory's scheduler config, else 17
    max_sequence_length: int = MAX_SEQUENCE_LENGTH

    def as_kwargs(self) -> dict[str, Any]:
        """The same options as :meth:`ContentVPipeline.__call__` keyword arguments (diffusers' names)."""
        return dict(
            num_frames=self.num_frames, height=self.height, width=self.width, num_inference_steps=self.num_steps,
            guidance_scale=self.guidance_scale, shift=self.shift, max_sequence_length=self.max_sequence_length,
        )


@dataclasses.dataclass
class ContentVPipelineOutput:
    """What :meth:`ContentVPipeline.__call__` returns, as diffusers' ``WanPipelineOutput``.

    ``frames``: with ``output_type="np"`` the videos, float32 NumPy (B, F, H, W, 3) in [0, 1] (channels-last,
    B = prompts x ``num_videos_per_prompt``); with ``output_type="latent"`` the final normalised latents,
    float32 (B, T, H / 8, W / 8, C).
    """

    frames: np.ndarray


OUTPUT_TYPES = ("np", "latent")
CALLBACK_TENSOR_INPUTS = ("latents",)


def _torch_noise(shape: Sequence[int], generator) -> np.ndarray:
    """diffusers' ``randn_tensor`` on the CPU in the official ``(B, C, T, H, W)`` layout, moved channels-last.

    ``generator``: a ``torch.Generator``, a list of one per video (each video drawn with its own, as diffusers
    does), or None (torch's global generator, as diffusers without a generator).
    """
    import torch

    b, t, h, w, c = shape
    if isinstance(generator, (list, tuple)):
        if len(generator) != b:
            raise ValueError(f"got a list of {len(generator)} generators for a batch of {b} videos; pass one per video")
        noise = torch.cat([torch.randn((1, c, t, h, w), generator=g, dtype=torch.float32) for g in generator])
    else:
        noise = torch.randn((b, c, t, h, w), generator=generator, dtype=torch.float32)
    return np.ascontiguousarray(noise.permute(0, 2, 3, 4, 1).numpy())


class ContentVPipeline:
    """Text -> video with a ContentV model directory, called like diffusers' pipelines.

    ``pipe = ContentVPipeline.from_pretrained(path)``; ``pipe(prompt=...).frames`` is float32 NumPy
    (B, F, H, W, 3) in [0, 1]; :func:`export_to_video` writes one video to an mp4. ``path`` holds
    ``transformer/``, ``vae/``, optionally ``scheduler/scheduler_config.json`` (the flow shift) and, unless
    prompt embeddings are given, ``text_encoder{,_2,_3}/`` and ``tokenizer{,_2,_3}/`` (the diffusers layout;
    our converted checkpoints load as well). Mirrors github bytedance/ContentV ``contentv_pipeline.py``.
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
        offload: bool | str = False,
        vae_slicing: bool = False,
    ):
        self.transformer = transformer
        self.vae = vae
        self.text_encoders = text_encoders
        self.shift = float(shift)
        self.context_dim, self.pooled_dim, self.in_channels = context_dim, pooled_dim, in_channels
        self.mesh = mesh
        self.vae_tiling = vae_tiling
        self.vae_slicing = vae_slicing
        self.offload_mode = offload_mode(offload)
        self.offload = self.offload_mode != "none"
        if self.offload_mode == "sequential" and mesh is not None:
            raise ValueError("offload='sequential' runs on one device; use FSDP on a mesh instead (mesh.fsdp=N)")
        self.on_block = None  # sequential offload: on_block(step, layer) after each block (memory monitoring)
        self._progress_bar_config: dict[str, Any] = {}
        # (prompt, max_sequence_length) -> (prompt_embeds (1, L, D), pooled (1, P)) for negative / empty
        # prompts: encoded once per pipeline, however many calls use them.
        self._negative_cache: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}
        if self.offload:
            # Parameters live in host memory; each part goes to the device only while it runs.
            nnx.update(transformer, to_host_memory(nnx.state(transformer)))
            if vae is not None:
                nnx.update(vae, to_host_memory(nnx.state(vae)))

    # ------------------------------------------------------------------------------------------------- loading
    @staticmethod
    def check_model_dir(model_dir: str | Path, *, need_text: bool = True, need_vae: bool = True, checkpoint: int | None = None):
        """Resolve ``model_dir`` (a run directory, ``RUN_DIR/pipeline``, a diffusers ContentV directory or our
        converted one; ``contentv_jax.runs.resolve``) and check that the parts needed are there, before loading.

        Returns the ``contentv_jax.runs.ModelSource``.
        Raises:
          FileNotFoundError: not a model or a run, a run without weights, or missing parts (every one named).
          ValueError: ``checkpoint`` for a directory that is not a run, or a step the run does not have (the
            message lists the steps it has).
        """
        from contentv_jax import runs

        src = runs.resolve(model_dir, checkpoint)
        if src.kind == "model dir":
            needed = (["vae"] if need_vae else []) + (list(TEXT_SUBFOLDERS) if need_text else [])
            missing = [d for d in needed if not (src.root / d).is_dir()]
            if missing:
                raise FileNotFoundError(
                    f"model directory {model_dir} lacks sub-folder(s) {missing} (a ContentV directory has "
                    f"transformer/, vae/, scheduler/, text_encoder{{,_2,_3}}/, tokenizer{{,_2,_3}}/)"
                )
            return src
        missing = [what for what, need, part in (
            ("its VAE (vae.path of its config.yaml, or assets/vae)", need_vae, src.vae),
            ("its text encoders (text.path of its config.yaml, or assets/text)", need_text, src.text),
        ) if need and part is None]
        if missing:
            raise FileNotFoundError(f"run {src.root} lacks {' and '.join(missing)}")
        return src

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        *,
        dtype=None,
        mesh: Mesh | None = None,
        attention_kernel: str | None = "auto",
        vae_tiling: bool = False,
        offload: bool | str = False,
        vae_slicing: bool = False,
        shift: float | None = None,
        checkpoint: int | None = None,
        load_text_encoders: bool = True,
        load_vae: bool = True,
        text_encoder_dtype=None,
        text_encoder_device: str | None = "cpu",
    ) -> ContentVPipeline:
        """Load a model (checked first: missing parts raise before anything is loaded).

        Args:
          pretrained_model_name_or_path: a local directory: a diffusers ContentV directory (``transformer/``,
            ``vae/``, ``scheduler/``, ``text_encoder{,_2,_3}/``, ``tokenizer{,_2,_3}/``), the same with our
            converted checkpoints, a training run directory (``python -m contentv_jax.train``: its
            ``pipeline/``, else its exported weights, else its latest checkpoint) or a run's ``pipeline/``.
          dtype: transformer dtype (a name such as ``"bfloat16"`` or a JAX dtype), for its parameters and
            matmuls (None: float32; the official demo uses bfloat16). The VAE runs in float32, as in the demo.
          attention_kernel: one of ``contentv_jax.models.attention.KERNEL_CHOICES``; default ``auto``
            (cuDNN flash on GPU, splash on TPU, ``chunked`` on CPU); None keeps the checkpoint config's.
            A kernel that cannot run on this backend raises ValueError when the model is built.
          mesh: sample sharded on this mesh (parameters by logical names; ``sequence`` > 1: Ulysses attention).
          vae_tiling: decode in spatial tiles (diffusers' ``enable_tiling`` sizes).
          offload: one of :data:`OFFLOAD_MODES` (``True``: ``"model"``): ``"model"`` keeps parameters in host
            memory, each model goes to the device only while it runs; ``"sequential"`` also streams the
            stacked blocks one at a time during denoising (one device only). Raises ValueError otherwise.
          vae_slicing: decode the videos of a batch one at a time.
          shift: flow shift; None: ``scheduler/scheduler_config.json``, else the run's ``sampling.shift``, else
            17 (ContentV report (arXiv 2506.05343), section 5.1).
          checkpoint: sample training checkpoint ``RUN_DIR/checkpoints/<checkpoint>`` of a run (its EMA weights
            when the run keeps an EMA) instead of the exported weights.
          load_text_encoders / load_vae: False when prompt embeddings / latents are all you need.
          text_encoder_dtype: torch dtype of the three text encoders (a name such as ``"bfloat16"`` or a
            ``torch.dtype``; None: float32; the official demo runs them in bfloat16).
          text_encoder_device: torch device of the text encoders (``"cpu"``, ``"cuda"``, ``"npu"``, ...;
            ``"auto"`` or None: the NPU when ``USE_ASCEND_NPU`` / detection says so, else CUDA if available).
        Raises:
          FileNotFoundError: not a model or a run, or needed parts missing (all named, with what was looked for).
          ValueError: a checkpoint step the run lacks (its steps listed), a bad dtype, kernel or device name.
        """
        from contentv_jax import runs

        src = cls.check_model_dir(pretrained_model_name_or_path, need_text=load_text_encoders, need_vae=load_vae,
                                  checkpoint=checkpoint)
        if shift is None:
            default = flow.DEFAULT_SAMPLING_SHIFT if src.shift is None else src.shift
            shift = flow.scheduler_shift(src.scheduler_config, default=default)
        dims = transformer_dims(src.transformer_config)
        if dtype is not None:
            dtype = jnp.dtype(dtype).name
        if attention_kernel is not None:
            from contentv_jax.models.attention import KERNEL_CHOICES

            if attention_kernel not in KERNEL_CHOICES:
                raise ValueError(f"attention_kernel {attention_kernel!r} is not one of {KERNEL_CHOICES}")
        overrides = {} if attention_kernel is None else {"attention_kernel": attention_kernel}
        if src.checkpoint is not None:
            logger.info("sampling training checkpoint %s", src.checkpoint)
            transformer = runs.load_checkpoint_transformer(src, dtype=dtype, **overrides)
        else:
            from contentv_jax.checkpoints import load_transformer

            transformer = load_transformer(src.transformer, dtype=dtype, param_dtype=dtype, **overrides)
        vae = None
        if load_vae:
            from contentv_jax.checkpoints import load_vae as _load_vae

            vae = _load_vae(src.vae)
        text = None
        if load_text_encoders:
            from contentv_jax.text import TextEncoders

            text = TextEncoders.from_pretrained(src.text, dtype=text_encoder_dtype, device=text_encoder_device)
        return cls(
            transformer, vae, text, shift=shift, mesh=mesh, vae_tiling=vae_tiling, offload=offload,
            vae_slicing=vae_slicing, **dims,
        )

    # ------------------------------------------------------------------------------------------- progress bar
    def set_progress_bar_config(self, **kwargs) -> None:
        """tqdm options of the denoising bar, as diffusers' ``set_progress_bar_config`` (``disable=True``: none)."""
        self._progress_bar_config = dict(kwargs)

    def _progress(self) -> dict[str, Any] | bool:
        if self._progress_bar_config.get("disable", False):
            return False
        return {k: v for k, v in self._progress_bar_config.items() if k != "disable"} or True

    # ------------------------------------------------------------------------------------------- text encoding
    def _encode_negative(self, negative: Sequence[str], max_sequence_length: int) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings of negative (or empty) prompts, each distinct one encoded once per pipeline."""
        todo = sorted({n for n in negative if (n, max_sequence_length) not in self._negative_cache})
        if todo:
            pe, pp = self.text_encoders.encode(todo, max_sequence_length=max_sequence_length)
            for i, n in enumerate(todo):
                self._negative_cache[(n, max_sequence_length)] = (_np32(pe)[i : i + 1], _np32(pp)[i : i + 1])
        hits = [self._negative_cache[(n, max_sequence_length)] for n in negative]
        return np.concatenate([h[0] for h in hits]), np.concatenate([h[1] for h in hits])

    def encode_prompt(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        *,
        do_classifier_free_guidance: bool = True,
        max_sequence_length: int = MAX_SEQUENCE_LENGTH,
    ) -> PromptEmbeds:
        """SD3 text encoding of ``prompt`` and, for guidance, of the negative prompt (diffusers' SD3
        ``encode_prompt``; the official demo's negative prompt when None). Negative prompts are encoded once
        per pipeline and reused. Returns float32 :class:`PromptEmbeds` of batch ``len(prompt)``.

        Raises:
          ValueError: no text encoders, or a negative prompt list of another length than ``prompt``.
        """
        if self.text_encoders is None:
            raise ValueError("this pipeline has no text encoders: pass prompt_embeds / pooled_prompt_embeds instead")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        pe, pp = self.text_encoders.encode(prompts, max_sequence_length=max_sequence_length)
        embeds = PromptEmbeds(_np32(pe), _np32(pp))
        if do_classifier_free_guidance:
            embeds.negative_prompt_embeds, embeds.negative_pooled_prompt_embeds = self._encode_negative(
                self._negative_list(negative_prompt, len(prompts)), max_sequence_length
            )
        return embeds

    @staticmethod
    def _negative_list(negative_prompt, n: int) -> list[str]:
        negative = DEFAULT_NEGATIVE_PROMPT if negative_prompt is None else negative_prompt
        negative = [negative] * n if isinstance(negative, str) else list(negative)
        if len(negative) != n:
            raise ValueError(f"negative_prompt has {len(negative)} entries for {n} prompts")
        return negative

    # ------------------------------------------------------------------------------------------------ sampling
    def __call__(
        self,
        prompt: str | Sequence[str] | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        num_frames: int = 125,
        height: int = 432,
        width: int = 768,
        num_inference_steps: int = 50,
        guidance_scale: float = 6.0,
        num_videos_per_prompt: int = 1,
        generator=None,
        latents=None,
        prompt_embeds=None,
        pooled_prompt_embeds=None,
        negative_prompt_embeds=None,
        negative_pooled_prompt_embeds=None,
        output_type: str = "np",
        return_dict: bool = True,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        max_sequence_length: int = MAX_SEQUENCE_LENGTH,
        *,
        seed: int | None = None,
        shift: float | None = None,
    ) -> ContentVPipelineOutput | tuple[np.ndarray]:
        """Generate videos; the arguments, their order and defaults are diffusers' (``WanPipeline`` /
        ``StableDiffusion3Pipeline``) and the official ContentV pipeline's.

        Args:
          prompt: a prompt or a list of them (or ``prompt_embeds`` instead).
          negative_prompt: the unconditional branch when ``guidance_scale > 1``; None: the official demo's
            negative prompt (:data:`DEFAULT_NEGATIVE_PROMPT`); ``""`` is the empty prompt.
          num_frames: pixel frames, rounded down to ``4k + 1`` with a warning as the official pipeline.
          height, width: pixels, multiples of 16.
          num_inference_steps: Euler steps. guidance_scale: CFG weight g (guidance runs when g > 1).
          num_videos_per_prompt: videos per prompt (consecutive in the batch).
          generator: a ``torch.Generator`` (or one per video) for the initial noise, drawn on the CPU in the
            official ``(B, C, T, H, W)`` layout as diffusers' ``randn_tensor``; None and no ``seed``: torch's
            global generator. Ignored when ``latents`` is given.
          seed: shorthand for ``generator=torch.Generator().manual_seed(seed)`` (the official demo's noise).
          latents: initial noise, float32 (B, T, H / 8, W / 8, C) channels-last.
          prompt_embeds (B, L, Dctx), pooled_prompt_embeds (B, Dpool), negative_prompt_embeds,
            negative_pooled_prompt_embeds: precomputed text conditioning (NumPy, JAX or torch); with
            guidance and no negative embeddings the negative prompt is encoded.
          output_type: ``"np"`` (frames) or ``"latent"`` (the final normalised latents).
          return_dict: False returns the tuple ``(frames,)``.
          callback_on_step_end: ``callback(pipe, step_index, timestep, callback_kwargs) -> dict`` after each
            step, as diffusers; ``callback_kwargs["latents"]`` is that step's latents (float32 NumPy,
            channels-last); a returned ``"latents"`` replaces them. With a callback the steps run one compiled
            step at a time instead of one compiled loop.
          callback_on_step_end_tensor_inputs: what ``callback_kwargs`` holds; only ``"latents"``.
          max_sequence_length: T5 tokens (256 for ContentV).
          shift: flow shift for this call (None: the pipeline's).
        Returns:
          :class:`ContentVPipelineOutput` (``.frames``), or ``(frames,)`` when ``return_dict`` is False.
        Raises:
          ValueError: bad size, frame count, step count, output type, prompt/embedding combination, embedding
            or latent shapes (all before any compute).
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        check_video_size(height, width)
        num_frames = round_num_frames(num_frames)
        if num_videos_per_prompt < 1:
            raise ValueError(f"num_videos_per_prompt must be >= 1, got {num_videos_per_prompt}")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if max_sequence_length < 1:
            raise ValueError(f"max_sequence_length must be >= 1, got {max_sequence_length}")
        if output_type == "np" and self.vae is None:
            raise ValueError("output_type 'np' needs a VAE (this pipeline was loaded without one)")
        if seed is not None and generator is not None:
            raise ValueError("give seed or generator, not both")
        bad = [k for k in callback_on_step_end_tensor_inputs if k not in CALLBACK_TENSOR_INPUTS]
        if bad:
            raise ValueError(f"callback_on_step_end_tensor_inputs {bad} are not among {list(CALLBACK_TENSOR_INPUTS)}")
        guidance = guidance_scale > 1.0
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("give prompt or prompt_embeds, not both")
        if prompt is None and prompt_embeds is None:
            raise ValueError("give prompt or prompt_embeds")
        embeds = None
        if prompt_embeds is not None:
            if pooled_prompt_embeds is None:
                raise ValueError("prompt_embeds needs pooled_prompt_embeds (the pooled CLIP output) as well")
            if (negative_prompt_embeds is None) != (negative_pooled_prompt_embeds is None):
                raise ValueError("give both negative_prompt_embeds and negative_pooled_prompt_embeds, or neither")
            embeds = PromptEmbeds(
                _np32(prompt_embeds), _np32(pooled_prompt_embeds),
                None if negative_prompt_embeds is None else _np32(negative_prompt_embeds),
                None if negative_pooled_prompt_embeds is None else _np32(negative_pooled_prompt_embeds),
            )
            if guidance and embeds.negative_prompt_embeds is None and self.text_encoders is None:
                raise ValueError(
                    "guidance_scale > 1 needs negative_prompt_embeds and negative_pooled_prompt_embeds "
                    "(this pipeline has no text encoders to encode the negative prompt)"
                )
            embeds.validate(self.context_dim, self.pooled_dim, guidance and embeds.negative_prompt_embeds is not None)
            batch = embeds.batch
        else:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            if not prompts:
                raise ValueError("prompt is an empty list")
            if self.text_encoders is None:
                raise ValueError("this pipeline has no text encoders: pass prompt_embeds and pooled_prompt_embeds")
            if guidance:
                self._negative_list(negative_prompt, len(prompts))  # checked before any compute
            batch = len(prompts)
        batch *= num_videos_per_prompt
        shape = latent_shape(batch, num_frames, height, width, self.in_channels)
        if latents is not None:
            latents = _np32(latents)
            if latents.shape != shape:
                raise ValueError(
                    f"latents must have shape {shape} for {num_frames} frames of {height}x{width}, got {latents.shape}"
                )
        # ---- compute
        if embeds is None:
            embeds = self.encode_prompt(
                prompts, negative_prompt, do_classifier_free_guidance=guidance, max_sequence_length=max_sequence_length
            )
        elif guidance and embeds.negative_prompt_embeds is None:
            embeds.negative_prompt_embeds, embeds.negative_pooled_prompt_embeds = self._encode_negative(
                self._negative_list(negative_prompt, embeds.batch), max_sequence_length
            )
        embeds.validate(self.context_dim, self.pooled_dim, guidance)
        embeds = embeds.repeat(num_videos_per_prompt)
        if latents is None:
            latents = initial_noise(seed, shape) if seed is not None else _torch_noise(shape, generator)
        sigmas = flow.sampling_sigmas(num_inference_steps, self.shift if shift is None else shift)
        if callback_on_step_end is None:
            out = self.denoise(latents, embeds, sigmas, guidance_scale, progress=self._progress())
        else:
            out = self._denoise_with_callback(latents, embeds, sigmas, guidance_scale, callback_on_step_end)
        if output_type == "latent":
            frames = np.asarray(out)
        else:
            frames = self.decode(out)
        return ContentVPipelineOutput(frames=frames) if return_dict else (frames,)

    def denoise(self, latents, embeds: PromptEmbeds, sigmas, guidance_scale: float, *, progress: bool = False):
        """The Euler loop with this pipeline's transformer, mesh and offload mode (:func:`denoise`, or
        :func:`denoise_sequential` for ``offload="sequential"``). Shapes as there; float32 latents."""
        if self.offload_mode == "sequential":
            return denoise_sequential(
                self.transformer, latents, embeds, sigmas, guidance_scale, progress=progress, on_block=self.on_block
            )
        return denoise(self.transformer, latents, embeds, sigmas, guidance_scale, mesh=self.mesh, progress=progress)

    def decode(self, latents) -> np.ndarray:
        """Normalised latents (B, T, h, w, 16) -> frames (B, F, H, W, 3) float32 in [0, 1] with this pipeline's
        VAE, tiling and slicing switches (:func:`decode_latents`); with offload the VAE's parameters are in
        device memory only during this call."""
        if self.vae is None:
            raise ValueError("this pipeline has no VAE")
        vae = self.vae
        if self.offload:
            graphdef, state = nnx.split(vae)
            vae = nnx.merge(graphdef, place_state(state, None))
        return decode_latents(vae, latents, tiling=self.vae_tiling, slicing=self.vae_slicing)

    def _denoise_with_callback(self, latents, embeds, sigmas, guidance_scale, callback) -> np.ndarray:
        """The Euler loop one compiled step at a time (:func:`denoise` over ``sigmas[i : i + 2]``), calling
        ``callback(self, i, sigma_i * 1000, {"latents": ...})`` after each step as diffusers does."""
        progress = self._progress()
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(sigmas) - 1, **({"desc": "denoising", "unit": "step"} | (progress if isinstance(progress, dict) else {})))
        x = latents
        try:
            for i in range(len(sigmas) - 1):
                x = np.asarray(self.denoise(x, embeds, sigmas[i : i + 2], guidance_scale))
                ret = callback(self, i, float(sigmas[i]) * flow.NUM_TRAIN_TIMESTEPS, {"latents": x})
                if ret and "latents" in ret:
                    new = _np32(ret["latents"])
                    if new.shape != x.shape:
                        raise ValueError(f"callback_on_step_end returned latents of shape {new.shape}, expected {x.shape}")
                    x = new
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        return x


def export_to_video(video_frames, output_video_path: str | Path | None = None, fps: float = 24) -> str:
    """Write one video to an H.264 mp4, in diffusers' ``export_to_video`` argument order; returns the path.

    Args:
      video_frames: (F, H, W, 3) float in [0, 1] or uint8 (e.g. ``pipe(...).frames[0]``), or a list of
        (H, W, 3) arrays or PIL images. H and W must be even.
      output_video_path: where to write (None: a new temporary ``.mp4`` file, as diffusers).
      fps: frames per second (ContentV's demo writes 24).
    Raises:
      ValueError: bad shape, dtype, odd size or non-positive fps (``contentv_jax.data.video.write_video``).
    """
    import tempfile

    from contentv_jax.data.video import write_video

    if isinstance(video_frames, (list, tuple)):
        video_frames = np.stack([np.asarray(f) for f in video_frames])
    video_frames = np.asarray(video_frames)
    if video_frames.ndim == 5:
        if video_frames.shape[0] != 1:
            raise ValueError(f"export_to_video writes one video; got a batch of {video_frames.shape[0]} (index it)")
        video_frames = video_frames[0]
    if output_video_path is None:
        fd, output_video_path = tempfile.mkstemp(suffix=".mp4")
        os.close(fd)
    return str(write_video(output_video_path, video_frames, fps))


def _np32(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, np.float32)

