"""Conversions between diffusers-format directories and our checkpoint format, per component.

``from_diffusers(component, src, dst)`` reads a diffusers directory through the component's
tensor-name map (``converters.transformer`` / ``converters.vae``) and saves our checkpoint with
``contentv_jax.checkpoints.save_checkpoint``; ``to_diffusers(component, src, dst)`` is the inverse.
Tensors keep their dtype, so diffusers -> ours -> diffusers is byte-identical. The CLIs
``python -m converters.from_diffusers`` / ``converters.to_diffusers`` call these.
"""

from __future__ import annotations

import logging
import os

import numpy as np
from flax import nnx

from contentv_jax import checkpoints
from converters import common
from converters import transformer as tconv
from converters import vae as vconv

log = logging.getLogger("converters.convert")

COMPONENTS = ("transformer", "vae")


def _check_component(component: str) -> None:
    if component not in COMPONENTS:
        raise ValueError(f"component {component!r} is not one of {COMPONENTS}")


def transformer_from_diffusers(src: str | os.PathLike, dst: str | os.PathLike, **config_overrides) -> None:
    """Convert a diffusers transformer directory (ContentV-8B or SD3.5 Large format) to our checkpoint.

    Args:
      src: config.json + safetensors (single or sharded).
      dst: our checkpoint directory (written atomically; replaced if present).
      config_overrides: our own TransformerConfig fields to store (``dtype``, ``remat_policy``, ...).
    Raises:
      CheckpointError: missing / unexpected / mis-shaped tensors (expected vs found shape), a config that
        disagrees with the tensors, unsupported or mixed dtypes. Nothing is written then.
    """
    cfg, tensors = tconv._read_diffusers(src)
    cfg = cfg.replace(**config_overrides)
    pure = tconv.diffusers_to_state(cfg, tensors)
    graphdef, state = nnx.split(tconv._abstract(cfg))
    nnx.replace_by_pure_dict(state, pure)
    checkpoints.save_checkpoint(dst, state, cfg.to_dict())
    log.info("wrote %s: %d tensors (%s), %d layers, width %d", dst, len(tensors), cfg.param_dtype, cfg.num_layers, cfg.width)


def transformer_to_diffusers(src: str | os.PathLike, dst: str | os.PathLike, *, max_shard_size: int = 10 * 2**30) -> None:
    """Convert our transformer checkpoint to a diffusers directory ContentV's ``SD3Transformer3DModel`` loads.

    Tensors are written in the dtype they are stored in; shards plus an index above ``max_shard_size`` bytes.
    Raises:
      CheckpointError: ``src`` is not our checkpoint.
    """
    from contentv_jax.models.transformer import TransformerConfig

    cfg = TransformerConfig.from_dict(checkpoints.read_our_config(src))
    graphdef, abstract_state = nnx.split(tconv._abstract(cfg))
    state = checkpoints.load_checkpoint(src, abstract_state, this_process_only=True)  # a whole copy here
    tensors = tconv.state_to_diffusers(cfg, nnx.to_pure_dict(state))
    common.write_diffusers_dir(dst, cfg.to_diffusers_config(), tensors, max_shard_size=max_shard_size)
    log.info("wrote %s: %d tensors (%s)", dst, len(tensors), cfg.param_dtype)


def vae_from_diffusers(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Convert a diffusers ``AutoencoderKLWan`` directory to our checkpoint (Orbax + config.json).

    Tensors keep their dtype. The diffusers config dict is stored whole (so :func:`vae_to_diffusers`
    restores it). Nothing is written unless every tensor maps.

    Raises:
      CheckpointError: missing / unexpected / mis-shaped tensors (each named) or a malformed directory.
      ValueError: a config that is not the Wan2.1 VAE.
    """
    from contentv_jax.models.vae import VAEConfig, abstract_vae

    config_dict, tensors = common.open_diffusers_dir(src)
    config = VAEConfig.from_diffusers(config_dict)
    pure = vconv._pure_state(config, tensors, what=str(src))
    state = nnx.state(abstract_vae(config), nnx.Param)
    nnx.replace_by_pure_dict(state, pure)
    checkpoints.save_checkpoint(dst, state, config_dict)


def vae_to_diffusers(src: str | os.PathLike, dst: str | os.PathLike, *, max_shard_size: int = 10 * 2**30) -> None:
    """Convert our VAE checkpoint back to a diffusers directory (config.json + safetensors; shards
    plus an index above ``max_shard_size`` bytes).

    Raises:
      CheckpointError: ``src`` is not our checkpoint, or a parameter is missing / mis-shaped there.
      ValueError: its config is not the Wan2.1 VAE.
    """
    from contentv_jax.models.vae import VAEConfig, abstract_vae

    config_dict = checkpoints.read_our_config(src)
    config = VAEConfig.from_diffusers(config_dict)
    # Restore in the stored dtypes so that bytes are kept as written.
    abstract = checkpoints.stored_abstract_state(src, nnx.state(abstract_vae(config), nnx.Param))
    state = checkpoints.load_checkpoint(src, abstract, this_process_only=True)
    flat = {tuple(p): v for p, v in nnx.to_flat_state(state)}
    tensors = {}
    for name, (path, _) in vconv.name_map(config).items():
        var = flat[path]
        arr = np.asarray(var.get_value() if hasattr(var, "get_value") else var)
        tensors[name] = vconv.to_torch(path, arr)
    common.write_diffusers_dir(dst, config_dict, tensors, weights_name=vconv.WEIGHTS_NAME, max_shard_size=max_shard_size)


_FROM = {"transformer": transformer_from_diffusers, "vae": vae_from_diffusers}
_TO = {"transformer": transformer_to_diffusers, "vae": vae_to_diffusers}


def from_diffusers(component: str, src: str | os.PathLike, dst: str | os.PathLike, **kwargs) -> None:
    """Convert the diffusers directory ``src`` of ``component`` (``transformer`` | ``vae``) to our checkpoint ``dst``.

    Raises:
      ValueError: an unknown component; CheckpointError as the component's converter.
    """
    _check_component(component)
    _FROM[component](src, dst, **kwargs)


def to_diffusers(component: str, src: str | os.PathLike, dst: str | os.PathLike, **kwargs) -> None:
    """Convert our checkpoint ``src`` of ``component`` (``transformer`` | ``vae``) to a diffusers directory ``dst``.

    Raises:
      ValueError: an unknown component; CheckpointError as the component's converter.
    """
    _check_component(component)
    _TO[component](src, dst, **kwargs)
