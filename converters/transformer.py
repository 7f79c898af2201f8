"""diffusers <-> contentv-jax conversion of the ContentV / SD3.5 Large transformer.

Name mapping (diffusers key -> our ``nnx`` state path):

- ``transformer_blocks.{i}.<rest>`` -> ``transformer_blocks.<rest'>[i]`` (stacked, leading ``layers`` axis)
  for ``i < num_layers - 1``, and ``final_block.<rest'>`` for the last (``context_pre_only``) block;
- inside a block: ``attn.to_out.0`` -> ``attn.to_out``, ``ff(_context).net.0.proj`` -> ``ff(_context).proj_in``,
  ``ff(_context).net.2`` -> ``ff(_context).proj_out``, RMSNorm ``weight`` -> ``scale``;
- every Linear ``weight`` ``(out, in)`` -> ``kernel`` ``(in, out)``; the patch conv ``pos_embed.proj.weight``
  ``(D, C, p, p)`` -> ``(p, p, C, D)``; biases unchanged.

SD3.5 Large's 2D ``pos_embed.pos_embed`` table is dropped with a logged note (ContentV does not use it).
Tensors keep their dtype (float32, bfloat16 or float16; one dtype per checkpoint), so
diffusers -> ours -> diffusers is byte-identical.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from converters import common
from converters.common import CheckpointError

log = logging.getLogger(__name__)

SD3_2D_POS_TABLE = "pos_embed.pos_embed"
_DTYPE_NAME = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


@dataclasses.dataclass(frozen=True)
class Entry:
    """One tensor: its diffusers name, our state path, the stacked layer index (or None) and the layout kind
    ('linear': transpose, 'conv': (out, in, kh, kw) <-> (kh, kw, in, out), 'copy')."""

    diffusers: str
    ours: tuple[str, ...]
    layer: int | None
    kind: str


def to_ours_layout(kind: str, a: np.ndarray) -> np.ndarray:
    """diffusers (torch) layout -> ours."""
    if kind == "linear":
        return np.ascontiguousarray(a.T)
    if kind == "conv":
        return np.ascontiguousarray(a.transpose(2, 3, 1, 0))
    return a


def to_diffusers_layout(kind: str, a: np.ndarray) -> np.ndarray:
    """ours -> diffusers (torch) layout."""
    if kind == "linear":
        return np.ascontiguousarray(a.T)
    if kind == "conv":
        return np.ascontiguousarray(a.transpose(3, 2, 0, 1))
    return a


def diffusers_shape(kind: str, our_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The diffusers shape of a tensor whose (unstacked) shape in our model is ``our_shape``."""
    if kind == "linear":
        return tuple(reversed(our_shape))
    if kind == "conv":
        kh, kw, cin, cout = our_shape
        return (cout, cin, kh, kw)
    return tuple(our_shape)


def _linear(dname: str, ours: tuple[str, ...], layer=None) -> list[Entry]:
    return [Entry(f"{dname}.weight", ours + ("kernel",), layer, "linear"), Entry(f"{dname}.bias", ours + ("bias",), layer, "copy")]


def _block_entries(prefix: str, ours: tuple[str, ...], layer: int | None, *, context_pre_only: bool, qk_norm: bool) -> list[Entry]:
    e = []
    e += _linear(f"{prefix}.norm1.linear", ours + ("norm1", "linear"), layer)
    e += _linear(f"{prefix}.norm1_context.linear", ours + ("norm1_context", "linear"), layer)
    for n in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
        e += _linear(f"{prefix}.attn.{n}", ours + ("attn", n), layer)
    e += _linear(f"{prefix}.attn.to_out.0", ours + ("attn", "to_out"), layer)
    if not context_pre_only:
        e += _linear(f"{prefix}.attn.to_add_out", ours + ("attn", "to_add_out"), layer)
    if qk_norm:
        for n in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
            e.append(Entry(f"{prefix}.attn.{n}.weight", ours + ("attn", n, "scale"), layer, "copy"))
    ffs = ("ff",) if context_pre_only else ("ff", "ff_context")
    for ff in ffs:
        e += _linear(f"{prefix}.{ff}.net.0.proj", ours + (ff, "proj_in"), layer)
        e += _linear(f"{prefix}.{ff}.net.2", ours + (ff, "proj_out"), layer)
    return e


def param_map(cfg) -> list[Entry]:
    """Every tensor of the diffusers checkpoint for ``cfg`` (a ``TransformerConfig``) and where it goes in ours."""
    e = [
        Entry("pos_embed.proj.weight", ("pos_embed", "proj", "kernel"), None, "conv"),
        Entry("pos_embed.proj.bias", ("pos_embed", "proj", "bias"), None, "copy"),
    ]
    for grp in ("timestep_embedder", "text_embedder"):
        for lin in ("linear_1", "linear_2"):
            e += _linear(f"time_text_embed.{grp}.{lin}", ("time_text_embed", grp, lin))
    e += _linear("context_embedder", ("context_embedder",))
    qk = cfg.qk_norm == "rms_norm"
    for i in range(cfg.num_layers - 1):
        e += _block_entries(f"transformer_blocks.{i}", ("transformer_blocks",), i, context_pre_only=False, qk_norm=qk)
    e += _block_entries(f"transformer_blocks.{cfg.num_layers - 1}", ("final_block",), None, context_pre_only=True, qk_norm=qk)
    e += _linear("norm_out.linear", ("norm_out", "linear"))
    e += _linear("proj_out", ("proj_out",))
    return e


def _flat(tree: Mapping, prefix=()) -> dict[tuple[str, ...], object]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, prefix + (str(k),)))
        else:
            out[prefix + (str(k),)] = v
    return out


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for k in path[:-1]:
        tree = tree[k] if k in tree else tree[int(k)]
    key = path[-1] if path[-1] in tree else int(path[-1])
    tree[key] = value


def abstract_pure_state(cfg) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
    """Our parameters for ``cfg`` as {path: ShapeDtypeStruct} (``nnx.eval_shape``, nothing allocated)."""
    from contentv_jax.models.transformer import abstract_model

    return _flat(nnx.to_pure_dict(nnx.state(abstract_model(cfg), nnx.Param)))


def expected_diffusers_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """{diffusers name: shape} our model for ``cfg`` needs, derived from its abstract parameters.

    Raises:
      CheckpointError: a parameter of ours that no diffusers tensor maps to, or a mapping to a missing parameter.
    """
    ours = abstract_pure_state(cfg)
    out, used, problems = {}, set(), []
    for e in param_map(cfg):
        if e.ours not in ours:
            problems.append(f"{e.diffusers} maps to {'.'.join(e.ours)}, which the model does not have")
            continue
        used.add(e.ours)
        shape = tuple(ours[e.ours].shape)
        out[e.diffusers] = diffusers_shape(e.kind, shape[1:] if e.layer is not None else shape)
    problems += [f"parameter {'.'.join(p)} has no diffusers tensor" for p in sorted(set(ours) - used)]
    if problems:
        raise CheckpointError("transformer mapping is incomplete:\n  " + "\n  ".join(problems))
    return out


def _read_diffusers(src) -> tuple[object, dict[str, common.LazyTensor]]:
    """Open, validate (config, names, shapes, dtypes) and return (TransformerConfig, tensors)."""
    from contentv_jax.models.transformer import TransformerConfig

    config, tensors = common.open_diffusers_dir(src)
    tensors = dict(tensors)
    if SD3_2D_POS_TABLE in tensors:
        log.info("%s: dropping SD3's 2D position table %s %s (ContentV uses a 3D sin-cos table)",
                 src, SD3_2D_POS_TABLE, tensors[SD3_2D_POS_TABLE].shape)
        del tensors[SD3_2D_POS_TABLE]
    common.check_dtypes({n: t.st_dtype for n, t in tensors.items()}, what=str(src))
    dtypes = sorted({t.st_dtype for t in tensors.values()})
    if len(dtypes) > 1:
        by = {d: sorted(n for n, t in tensors.items() if t.st_dtype == d) for d in dtypes}
        raise CheckpointError(f"{src}: mixed tensor dtypes {dtypes}; expected one: " + "; ".join(f"{d}: {v[:5]}" for d, v in by.items()))
    try:
        cfg = TransformerConfig.from_diffusers_config(config, param_dtype=_DTYPE_NAME[dtypes[0]] if dtypes else "float32")
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{src}/config.json: {e}") from e
    common.check_tensors(expected_diffusers_shapes(cfg), {n: t.shape for n, t in tensors.items()},
                         what=f"{src} (config: {cfg.num_layers} layers, width {cfg.width})")
    return cfg, tensors


def diffusers_to_state(cfg, tensors: Mapping[str, common.LazyTensor]) -> dict:
    """Load every tensor, change its layout and stack the blocks: a nested pure dict for ``nnx.replace_by_pure_dict``."""
    ours = abstract_pure_state(cfg)
    flat: dict[tuple[str, ...], np.ndarray] = {}
    for e in param_map(cfg):
        a = to_ours_layout(e.kind, tensors[e.diffusers].load())
        if e.layer is None:
            flat[e.ours] = a
        else:
            if e.ours not in flat:
                flat[e.ours] = np.empty(ours[e.ours].shape, dtype=a.dtype)
            flat[e.ours][e.layer] = a
    pure = nnx.to_pure_dict(nnx.state(_abstract(cfg), nnx.Param))
    for path, a in flat.items():
        _set(pure, path, jnp.asarray(a))
    return pure


def _abstract(cfg):
    from contentv_jax.models.transformer import abstract_model

    return abstract_model(cfg)


def state_to_diffusers(cfg, pure: Mapping) -> dict[str, np.ndarray]:
    """Inverse of :func:`diffusers_to_state`: {diffusers name: numpy array in torch layout}."""
    flat = {p: np.asarray(v) for p, v in _flat(pure).items()}
    out = {}
    for e in param_map(cfg):
        a = flat[e.ours] if e.layer is None else flat[e.ours][e.layer]
        out[e.diffusers] = to_diffusers_layout(e.kind, a)
    return out


def load_diffusers(src, *, dtype: str = "float32", **overrides):
    """Build an ``MMDiT`` from a diffusers directory (no intermediate files). Raises CheckpointError."""
    cfg, tensors = _read_diffusers(src)
    cfg = cfg.replace(dtype=dtype, **overrides)
    pure = diffusers_to_state(cfg, tensors)
    model = _abstract(cfg)
    graphdef, state = nnx.split(model)
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)
