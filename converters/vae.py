"""Wan2.1 VAE checkpoints: diffusers ``AutoencoderKLWan`` safetensors <-> our :class:`WanVAE` state.

Names: our parameter path joined with ``.`` is the diffusers name, except ``kernel`` -> ``weight``
and a ``Resample``'s conv ``resample`` -> ``resample.1`` (diffusers' ``nn.Sequential`` index).
Layouts (docs/design.md): torch Conv3d ``(out, in, kt, kh, kw)`` <-> ours ``(kt, kh, kw, in, out)``;
Conv2d ``(out, in, kh, kw)`` <-> ``(kh, kw, in, out)``; RMS-norm ``gamma`` ``(C, 1, 1, 1)`` (``(C, 1, 1)``
in attention blocks) <-> ``(C,)``. Transposes and reshapes only, so tensors keep their dtype and
the round trip diffusers -> ours -> diffusers is byte-identical.

The conversions to and from our checkpoint format are ``converters.convert`` (CLI:
``python -m converters.from_diffusers --component vae --src DIR --dst DIR`` and
``python -m converters.to_diffusers --component vae --src DIR --dst DIR``).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from converters import common

WEIGHTS_NAME = "diffusion_pytorch_model"


def _torch_name(path: tuple) -> str:
    parts = [str(p) for p in path]
    if parts[-1] == "kernel":
        parts[-1] = "weight"
    if len(parts) >= 2 and parts[-2] == "resample":
        parts.insert(len(parts) - 1, "1")
    return ".".join(parts)


def _torch_shape(path: tuple, shape: tuple[int, ...]) -> tuple[int, ...]:
    leaf = path[-1]
    if leaf == "kernel":  # (*k, in, out) -> (out, in, *k)
        return (shape[-1], shape[-2], *shape[:-2])
    if leaf == "gamma":
        return (shape[0], 1, 1) if "attentions" in path else (shape[0], 1, 1, 1)
    return tuple(shape)


def to_ours(path: tuple, tensor: np.ndarray) -> np.ndarray:
    """A diffusers tensor in our layout (see module docstring); ``path`` is our parameter path."""
    if path[-1] == "kernel":
        n = tensor.ndim
        return np.ascontiguousarray(np.transpose(tensor, (*range(2, n), 1, 0)))
    if path[-1] == "gamma":
        return tensor.reshape(tensor.shape[0])
    return tensor


def to_torch(path: tuple, tensor: np.ndarray) -> np.ndarray:
    """Inverse of :func:`to_ours`."""
    if path[-1] == "kernel":
        n = tensor.ndim
        return np.ascontiguousarray(np.transpose(tensor, (n - 1, n - 2, *range(n - 2))))
    return np.ascontiguousarray(tensor.reshape(_torch_shape(path, tensor.shape)))


def name_map(config) -> dict[str, tuple[tuple, tuple[int, ...]]]:
    """{diffusers name: (our parameter path, diffusers shape)} for a :class:`VAEConfig`."""
    from flax import nnx

    from contentv_jax.models.vae import abstract_vae

    state = nnx.state(abstract_vae(config), nnx.Param)
    out = {}
    for path, var in nnx.to_flat_state(state):
        shape = tuple(var.get_value().shape)
        out[_torch_name(path)] = (tuple(path), _torch_shape(path, shape))
    return out


def expected_shapes(config) -> dict[str, tuple[int, ...]]:
    """{diffusers tensor name: shape} of an ``AutoencoderKLWan`` checkpoint with this config."""
    return {k: v[1] for k, v in name_map(config).items()}


def _pure_state(config, tensors: Mapping[str, common.LazyTensor], *, what: str, dtype=None) -> dict:
    """Validate names/shapes/dtypes, then load every tensor into our nested pure dict (our layout)."""
    names = name_map(config)
    common.check_tensors({k: v[1] for k, v in names.items()}, {k: t.shape for k, t in tensors.items()}, what=what)
    common.check_dtypes({k: t.st_dtype for k, t in tensors.items()}, what=what)
    pure: dict = {}
    for name, (path, _) in names.items():
        arr = to_ours(path, tensors[name].load())
        if dtype is not None:
            arr = arr.astype(dtype)
        d = pure
        for p in path[:-1]:
            d = d.setdefault(p, {})
        d[path[-1]] = arr
    return pure


def model_from_tensors(config, tensors: Mapping[str, common.LazyTensor], *, dtype=None, what: str = "VAE checkpoint"):
    """Build a :class:`WanVAE` from diffusers-named tensors (``LazyTensor`` s), checked first.

    Raises:
      converters.common.CheckpointError: naming every missing / unexpected / mis-shaped tensor.
    """
    import jax.numpy as jnp
    from flax import nnx

    from contentv_jax.models.vae import abstract_vae

    dtype = jnp.dtype(dtype or jnp.float32)
    pure = _pure_state(config, tensors, what=what, dtype=dtype)
    graphdef, state = nnx.split(abstract_vae(config, dtype))
    nnx.replace_by_pure_dict(state, _tree_asarray(pure))
    return nnx.merge(graphdef, state)


def _tree_asarray(tree):
    import jax
    import jax.numpy as jnp

    return jax.tree.map(jnp.asarray, tree)
