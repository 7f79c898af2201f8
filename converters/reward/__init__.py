"""Reward-model checkpoints -> our Flax NNX reward models (``contentv_jax.models.reward``).

Declarative name tables (one :class:`Entry` per tensor of ours, plus the known non-parameter buffers):

- HF ``CLIPModel`` (``transformers/models/clip/modeling_clip.py``; PickScore_v1, the MPS backbone):
  :func:`clip_hf_table`;
- open_clip ``CLIP`` (``open_clip/model.py``, ``open_clip/transformer.py``; HPSv2 / v2.1):
  :func:`clip_open_clip_table`;
- MPS (github Kwai-Kolors/MPS, ``trainer/models/clip_model.py`` state dict: ``model.`` = HF CLIPModel,
  ``cross_model.`` = ``Cross_model``): :func:`mps_table`.

Sources read: an HF model directory (``config.json`` + ``model.safetensors`` [sharded or not] or
``pytorch_model.bin``), a ``.safetensors`` file, or a PyTorch state dict (``.pt``/``.pth``/``.bin``/
``.ckpt``) read with ``torch.load(..., weights_only=True)`` only: a file that pickles code (a whole
``nn.Module``, as the MPS release ``MPS_overall_checkpoint.pth`` is) is refused with the reason; re-save
it once where you trust it as ``torch.save(model.state_dict(), path)``. ``{"state_dict": {...}}``
wrappers (HPSv2's files) are unwrapped.

Before anything is loaded, names and shapes are checked against the table: every missing, unexpected
and mis-shaped tensor is listed with its expected and found shape (:class:`CheckpointError`).

Layouts: torch Linear ``(out, in)`` -> our kernel ``(in, out)``; torch Conv2d ``(out, in, kh, kw)`` ->
``(kh, kw, in, out)``; open_clip's fused ``in_proj_weight (3W, W)`` / ``in_proj_bias (3W,)`` -> our
``q_proj``/``k_proj``/``v_proj``; open_clip's ``proj``/``text_projection`` are already ``(in, out)``.

CLI: ``python -m converters.reward --name clip|pickscore|mps|hps --src PATH --dst DIR`` writes our
checkpoint (``config.json`` + Orbax ``state/``, atomically); exit 0, 1 on a checkpoint error, 2 on bad
arguments.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from flax import nnx

from contentv_jax import checkpoints
from converters import common
from converters.common import CheckpointError

log = logging.getLogger(__name__)

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
REWARD_FORMAT_KEY = "reward"  # our config.json: {"reward": name, "config": {...}}


# ----------------------------------------------------------------------------------------------
# Tables


@dataclasses.dataclass(frozen=True)
class Entry:
    """One parameter of ours and where it comes from.

    ``src``: checkpoint tensor name; ``src_shape``: its shape; ``dst``: our dotted parameter path;
    ``op``: ``"id"``, ``"T"`` (Linear weight), ``"conv"`` (Conv2d weight), ``"chunk{i}of{n}"`` (the
    ``i``-th of ``n`` equal row blocks; then transposed if 2-D).
    """

    src: str
    src_shape: tuple[int, ...]
    dst: str
    op: str = "id"


@dataclasses.dataclass(frozen=True)
class Buffer:
    """A non-parameter tensor a checkpoint may carry: checked (shape, and ``value`` if given), never loaded."""

    src: str
    shape: tuple[int, ...]
    value: object = None  # a callable returning the expected numpy array, or None (shape only)
    optional: bool = True


def op_shape(op: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Our shape for a source tensor of ``shape`` under ``op``."""
    if op == "id":
        return tuple(shape)
    if op == "T":
        return tuple(shape[::-1])
    if op == "conv":
        o, i, kh, kw = shape
        return (kh, kw, i, o)
    if op.startswith("chunk"):
        _, n = (int(x) for x in op[5:].split("of"))
        rows = shape[0] // n
        return (shape[1], rows) if len(shape) == 2 else (rows,)
    raise ValueError(f"unknown op {op!r}")


def apply_op(op: str, a: np.ndarray) -> np.ndarray:
    """Apply ``op`` (see :class:`Entry`) to a numpy array in the source layout."""
    if op == "id":
        return a
    if op == "T":
        return a.T
    if op == "conv":
        return a.transpose(2, 3, 1, 0)
    if op.startswith("chunk"):
        i, n = (int(x) for x in op[5:].split("of"))
        rows = a.shape[0] // n
        blk = a[i * rows:(i + 1) * rows]
        return blk.T if blk.ndim == 2 else blk
    raise ValueError(f"unknown op {op!r}")


def _lin(src, dst, din, dout, bias=True) -> list[Entry]:
    e = [Entry(f"{src}.weight", (dout, din), f"{dst}.kernel", "T")]
    return e + ([Entry(f"{src}.bias", (dout,), f"{dst}.bias")] if bias else [])


def _ln(src, dst, w, weight="weight", bias="bias") -> list[Entry]:
    return [Entry(f"{src}.{weight}", (w,), f"{dst}.scale"), Entry(f"{src}.{bias}", (w,), f"{dst}.bias")]


def _hf_encoder(src, dst, n, w, mlp) -> list[Entry]:
    e = []
    for i in range(n):
        s, d = f"{src}.layers.{i}", f"{dst}.layers.{i}"
        e += _ln(f"{s}.layer_norm1", f"{d}.layer_norm1", w) + _ln(f"{s}.layer_norm2", f"{d}.layer_norm2", w)
        for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
            e += _lin(f"{s}.self_attn.{p}", f"{d}.self_attn.{p}", w, w)
        e += _lin(f"{s}.mlp.fc1", f"{d}.mlp.fc1", w, mlp) + _lin(f"{s}.mlp.fc2", f"{d}.mlp.fc2", mlp, w)
    return e


def clip_hf_table(cfg, src_prefix: str = "", dst_prefix: str = "") -> tuple[list[Entry], list[Buffer]]:
    """HF ``CLIPModel`` state-dict names -> our :class:`CLIPModel` parameters, for ``cfg`` (our ``CLIPConfig``)."""
    t, v, s, d = cfg.text_config, cfg.vision_config, src_prefix, dst_prefix
    tw, vw, p = t.hidden_size, v.hidden_size, v.patch_size
    e = [
        Entry(f"{s}text_model.embeddings.token_embedding.weight", (t.vocab_size, tw), f"{d}text_model.embeddings.token_embedding"),
        Entry(f"{s}text_model.embeddings.position_embedding.weight", (t.max_position_embeddings, tw),
              f"{d}text_model.embeddings.position_embedding"),
        *_hf_encoder(f"{s}text_model.encoder", f"{d}text_model.encoder", t.num_hidden_layers, tw, t.intermediate_size),
        *_ln(f"{s}text_model.final_layer_norm", f"{d}text_model.final_layer_norm", tw),
        Entry(f"{s}vision_model.embeddings.class_embedding", (vw,), f"{d}vision_model.embeddings.class_embedding"),
        Entry(f"{s}vision_model.embeddings.patch_embedding.weight", (vw, v.num_channels, p, p),
              f"{d}vision_model.embeddings.patch_embedding.kernel", "conv"),
        Entry(f"{s}vision_model.embeddings.position_embedding.weight", (v.num_positions, vw),
              f"{d}vision_model.embeddings.position_embedding"),
        *_ln(f"{s}vision_model.pre_layrnorm", f"{d}vision_model.pre_layernorm", vw),
        *_hf_encoder(f"{s}vision_model.encoder", f"{d}vision_model.encoder", v.num_hidden_layers, vw, v.intermediate_size),
        *_ln(f"{s}vision_model.post_layernorm", f"{d}vision_model.post_layernorm", vw),
        *_lin(f"{s}visual_projection", f"{d}visual_projection", vw, cfg.projection_dim, bias=False),
        *_lin(f"{s}text_projection", f"{d}text_projection", tw, cfg.projection_dim, bias=False),
        Entry(f"{s}logit_scale", (), f"{d}logit_scale"),
    ]
    # Older transformers saved the position-id buffers; they must be arange.
    buffers = [
        Buffer(f"{s}text_model.embeddings.position_ids", (1, t.max_position_embeddings),
               lambda n=t.max_position_embeddings: np.arange(n)[None]),
        Buffer(f"{s}vision_model.embeddings.position_ids", (1, v.num_positions), lambda n=v.num_positions: np.arange(n)[None]),
    ]
    return e, buffers


def _oc_blocks(src, dst, n, w, mlp) -> list[Entry]:
    e = []
    for i in range(n):
        s, d = f"{src}.resblocks.{i}", f"{dst}.layers.{i}"
        e += _ln(f"{s}.ln_1", f"{d}.layer_norm1", w) + _ln(f"{s}.ln_2", f"{d}.layer_norm2", w)
        for j, q in enumerate(("q_proj", "k_proj", "v_proj")):
            e += [Entry(f"{s}.attn.in_proj_weight", (3 * w, w), f"{d}.self_attn.{q}.kernel", f"chunk{j}of3"),
                  Entry(f"{s}.attn.in_proj_bias", (3 * w,), f"{d}.self_attn.{q}.bias", f"chunk{j}of3")]
        e += _lin(f"{s}.attn.out_proj", f"{d}.self_attn.out_proj", w, w)
        e += _lin(f"{s}.mlp.c_fc", f"{d}.mlp.fc1", w, mlp) + _lin(f"{s}.mlp.c_proj", f"{d}.mlp.fc2", mlp, w)
    return e


def clip_open_clip_table(cfg, src_prefix: str = "", dst_prefix: str = "") -> tuple[list[Entry], list[Buffer]]:
    """open_clip ``CLIP`` state-dict names (``visual.*``, ``transformer.*``, ...) -> our :class:`CLIPModel`."""
    t, v, s, d = cfg.text_config, cfg.vision_config, src_prefix, dst_prefix
    tw, vw, p = t.hidden_size, v.hidden_size, v.patch_size
    e = [
        Entry(f"{s}token_embedding.weight", (t.vocab_size, tw), f"{d}text_model.embeddings.token_embedding"),
        Entry(f"{s}positional_embedding", (t.max_position_embeddings, tw), f"{d}text_model.embeddings.position_embedding"),
        *_oc_blocks(f"{s}transformer", f"{d}text_model.encoder", t.num_hidden_layers, tw, t.intermediate_size),
        *_ln(f"{s}ln_final", f"{d}text_model.final_layer_norm", tw),
        Entry(f"{s}text_projection", (tw, cfg.projection_dim), f"{d}text_projection.kernel"),
        Entry(f"{s}visual.class_embedding", (vw,), f"{d}vision_model.embeddings.class_embedding"),
        Entry(f"{s}visual.conv1.weight", (vw, v.num_channels, p, p), f"{d}vision_model.embeddings.patch_embedding.kernel", "conv"),
        Entry(f"{s}visual.positional_embedding", (v.num_positions, vw), f"{d}vision_model.embeddings.position_embedding"),
        *_ln(f"{s}visual.ln_pre", f"{d}vision_model.pre_layernorm", vw),
        *_oc_blocks(f"{s}visual.transformer", f"{d}vision_model.encoder", v.num_hidden_layers, vw, v.intermediate_size),
        *_ln(f"{s}visual.ln_post", f"{d}vision_model.post_layernorm", vw),
        Entry(f"{s}visual.proj", (vw, cfg.projection_dim), f"{d}visual_projection.kernel"),
        Entry(f"{s}logit_scale", (), f"{d}logit_scale"),
    ]
    n = t.max_position_embeddings
    buffers = [Buffer(f"{s}attn_mask", (n, n), lambda n=n: np.triu(np.full((n, n), -np.inf, np.float32), 1))]
    return e, buffers


def mps_table(cfg) -> tuple[list[Entry], list[Buffer]]:
    """The MPS state dict (``model.`` HF CLIPModel, ``cross_model.layers.{i}.{0,1}.fn.*``) -> our :class:`MPSModel`.

    ``cross_model`` LayerNorms carry a constant zero ``bias`` buffer and each self-attention block a
    ``rotary_emb.inv_freq`` buffer: both are checked against their fixed values, not loaded.
    """
    e, buffers = clip_hf_table(cfg.clip, "model.", "clip.")
    dim, h, dh, m = cfg.clip.projection_dim, cfg.heads, cfg.dim_head, cfg.ff_mult
    inv_freq = lambda: 1.0 / (10000 ** (np.arange(0, dh, 2, dtype=np.float32) / dh))
    for i in range(cfg.layer_num):
        c, b = f"cross_model.layers.{i}.0.fn", f"cross_model.layers.{i}.1.fn"
        dc, db = f"cross_model.layers.{i}.cross_attn", f"cross_model.layers.{i}.block"
        e += [
            Entry(f"{c}.norm.weight", (dim,), f"{dc}.norm.scale"),
            *_lin(f"{c}.to_q", f"{dc}.to_q", dim, h * dh, bias=False),
            *_lin(f"{c}.to_kv", f"{dc}.to_kv", dim, 2 * dh, bias=False),
            *_lin(f"{c}.to_out", f"{dc}.to_out", h * dh, dim, bias=False),
            *_lin(f"{c}.ff.0", f"{dc}.ff_in", dim, 2 * m * dim, bias=False),
            *_lin(f"{c}.ff.2", f"{dc}.ff_out", m * dim, dim, bias=False),
            Entry(f"{b}.norm.weight", (dim,), f"{db}.norm.scale"),
            *_lin(f"{b}.fused_attn_ff_proj", f"{db}.fused_attn_ff_proj", dim, h * dh + 2 * dh + 2 * m * dim, bias=False),
            *_lin(f"{b}.attn_out", f"{db}.attn_out", h * dh, dim, bias=False),
            *_lin(f"{b}.ff_out.1", f"{db}.ff_out", m * dim, dim, bias=False),
        ]
        buffers += [Buffer(f"{c}.norm.bias", (dim,), lambda: np.zeros((dim,), np.float32)),
                    Buffer(f"{b}.norm.bias", (dim,), lambda: np.zeros((dim,), np.float32)),
                    Buffer(f"{b}.rotary_emb.inv_freq", (dh // 2,), inv_freq)]
    return e, buffers


def table(name: str, cfg, layout: str | None = None) -> tuple[list[Entry], list[Buffer]]:
    """The table for reward ``name`` (``clip``/``pickscore``: HF; ``hps``: open_clip, or HF with ``layout="hf"``; ``mps``)."""
    from contentv_jax.models.reward import canonical_name

    name = canonical_name(name)
    if name == "mps":
        return mps_table(cfg)
    if name == "hps" and layout != "hf":
        return clip_open_clip_table(cfg)
    if name in ("clip", "hps"):
        return clip_hf_table(cfg)
    raise ValueError(f"reward {name!r} has no checkpoint")


# ----------------------------------------------------------------------------------------------
# Reading


class _Tensor:
    """A named source tensor: ``shape``, ``dtype`` (a string), ``load() -> np.ndarray``."""

    def __init__(self, name, shape, dtype, load):
        self.name, self.shape, self.dtype, self._load = name, tuple(int(s) for s in shape), str(dtype), load

    def load(self) -> np.ndarray:
        return self._load()


def _torch_to_numpy(t) -> np.ndarray:
    import torch

    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.detach().cpu().numpy()


def read_torch_state_dict(file: str | os.PathLike) -> dict[str, _Tensor]:
    """``torch.load(file, weights_only=True)``: a ``{name: tensor}`` dict (or ``{"state_dict": {...}}``).

    Raises:
      CheckpointError: the file pickles objects beyond tensors and containers (e.g. a whole module),
        or does not hold a flat ``{str: tensor}`` mapping.
    """
    import pickle

    import torch

    file = Path(file)
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{file}: refusing to unpickle it: it is not a plain state dict (torch.load weights_only=True "
            f"rejected it: {first}). A pickled module (like the MPS release's .pth) runs code when loaded; re-save it "
            f"where you trust it as torch.save(model.state_dict(), path)") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{file}: cannot read as a PyTorch state dict: {e}") from None
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{file}: expected a state dict {{name: tensor}}, found a {type(obj).__name__}")
    bad = [f"{k!r} ({type(v).__name__})" for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if bad:
        raise CheckpointError(f"{file}: expected a state dict {{name: tensor}}; non-tensor entries: {', '.join(bad[:20])}")
    return {k: _Tensor(k, v.shape, str(v.dtype).removeprefix("torch."), lambda v=v: _torch_to_numpy(v)) for k, v in obj.items()}


def _from_lazy(tensors: Mapping[str, common.LazyTensor]) -> dict[str, _Tensor]:
    dt = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I64": "int64", "I32": "int32"}
    return {n: _Tensor(n, t.shape, dt.get(t.st_dtype, t.st_dtype), lambda t=t: np.asarray(t.load(), np.float32)
                       if t.st_dtype == "BF16" else t.load()) for n, t in tensors.items()}


def read_safetensors(file: str | os.PathLike) -> dict[str, _Tensor]:
    """Index a single ``.safetensors`` file lazily (safetensors' own header validation)."""
    try:
        return _from_lazy(common._open_safetensors(Path(file)))
    except CheckpointError:
        raise
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"{file}: not a readable safetensors file: {e}") from None


def read_tensors(path: str | os.PathLike) -> tuple[dict | None, dict[str, _Tensor]]:
    """Open a checkpoint: (``config.json`` dict or ``None``, {name: tensor}).

    ``path``: an HF model directory (``config.json`` + safetensors or ``pytorch_model.bin``), a
    ``.safetensors`` file, or a PyTorch state-dict file (``.pt``, ``.pth``, ``.bin``, ``.ckpt``).

    Raises:
      CheckpointError: no such checkpoint, an unknown file type, or an unreadable / unsafe file.
    """
    p = Path(path)
    if p.is_dir():
        cfg = json.loads((p / common.CONFIG_NAME).read_text()) if (p / common.CONFIG_NAME).is_file() else None
        if cfg is not None and (any(p.glob("*.safetensors")) or any(p.glob("*.safetensors.index.json"))):
            cfg, lazy = common.open_diffusers_dir(p)
            return cfg, _from_lazy(lazy)
        files = sorted(p.glob("*.safetensors"))
        if len(files) == 1:
            return cfg, read_safetensors(files[0])
        bins = sorted(f for f in p.iterdir() if f.suffix in TORCH_SUFFIXES)
        if len(bins) == 1:
            return cfg, read_torch_state_dict(bins[0])
        raise CheckpointError(f"{p}: expected *.safetensors or one PyTorch state-dict file, found {[f.name for f in bins] or 'none'}")
    if not p.is_file():
        raise CheckpointError(f"{p}: no such checkpoint file or directory")
    if p.suffix == ".safetensors":
        return None, read_safetensors(p)
    if p.suffix in TORCH_SUFFIXES:
        return None, read_torch_state_dict(p)
    raise CheckpointError(f"{p}: unknown checkpoint type {p.suffix!r}; expected a directory, .safetensors or one of {TORCH_SUFFIXES}")


# ----------------------------------------------------------------------------------------------
# Loading


def _flat(tree: Mapping, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _set(tree, dotted: str, value) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        tree = tree[k] if k in tree else tree[int(k)]
    tree[keys[-1] if keys[-1] in tree else int(keys[-1])] = value


def abstract_params(model_factory) -> tuple[object, dict[str, object]]:
    """``(abstract model, {dotted path: ShapeDtypeStruct})`` of ``model_factory()`` via ``nnx.eval_shape`` (nothing allocated)."""
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(model_factory)
    return model, _flat(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def check_table(entries, ours: Mapping[str, object], *, what: str) -> None:
    """Every parameter of ours has exactly one entry, and each entry's source shape maps to its shape.

    Raises:
      CheckpointError: listing each parameter without an entry, each entry without a parameter, and
        each shape disagreement.
    """
    problems, seen = [], set()
    for e in entries:
        if e.dst not in ours:
            problems.append(f"{e.src} maps to {e.dst}, which the model does not have")
            continue
        if e.dst in seen:
            problems.append(f"{e.dst} is mapped twice")
        seen.add(e.dst)
        want, got = tuple(ours[e.dst].shape), op_shape(e.op, e.src_shape)
        if want != got:
            problems.append(f"{e.src} {e.src_shape} -> {e.dst}: gives {got}, the model has {want}")
    problems += [f"parameter {n} has no source tensor" for n in sorted(set(ours) - seen)]
    if problems:
        raise CheckpointError(f"{what}: mapping does not cover the model:\n  " + "\n  ".join(problems))


def check_checkpoint(entries, buffers, tensors: Mapping[str, _Tensor], *, what: str) -> None:
    """Names, shapes, dtypes and buffer values of ``tensors`` against the table, before any parameter is loaded.

    Raises:
      CheckpointError: every missing / unexpected / mis-shaped tensor (expected and found shape), every
        non-floating parameter, every buffer whose value differs from its fixed one.
    """
    expected = {e.src: tuple(e.src_shape) for e in entries}
    found = {n: t.shape for n, t in tensors.items()}
    for b in buffers:
        if b.src in found or not b.optional:
            expected[b.src] = tuple(b.shape)
    common.check_tensors(expected, found, what=what)
    bad = sorted(f"tensor {n}: expected a floating dtype, found {tensors[n].dtype}"
                 for n in {e.src for e in entries} if not tensors[n].dtype.startswith(("float", "bfloat")))
    for b in buffers:
        if b.src in tensors and b.value is not None:
            got, want = tensors[b.src].load(), b.value()
            if not np.allclose(np.asarray(got, np.float64), np.asarray(want, np.float64), rtol=1e-6, atol=0):
                bad.append(f"buffer {b.src}: expected its fixed value, found different values")
    if bad:
        raise CheckpointError(f"{what}: {len(bad)} problem(s):\n  " + "\n  ".join(bad))


def load_params(model_factory, entries, buffers, tensors: Mapping[str, _Tensor], *, what: str):
    """Check everything, then build the model from ``tensors``; returns the loaded ``nnx.Module``.

    Parameters are cast to the model's parameter dtype (float32 by default). Nothing is loaded when
    any check fails.
    """
    import jax.numpy as jnp

    model, ours = abstract_params(model_factory)
    check_table(entries, ours, what=what)
    check_checkpoint(entries, buffers, tensors, what=what)
    graphdef, state = nnx.split(model)
    pure = nnx.to_pure_dict(state)
    for e in entries:
        a = apply_op(e.op, tensors[e.src].load())
        _set(pure, e.dst, jnp.asarray(a, dtype=ours[e.dst].dtype))
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


# ----------------------------------------------------------------------------------------------
# Our format and the CLI


def save_reward(dst: str | os.PathLike, name: str, model) -> None:
    """Write ``model`` as our checkpoint: ``config.json`` ``{"reward": name, "config": model.config.to_dict()}``
    plus the Orbax ``state/`` of its parameters (atomically)."""
    checkpoints.save_checkpoint(dst, nnx.state(model, nnx.Param), {REWARD_FORMAT_KEY: name, "config": model.config.to_dict()})


def load_our_reward(path: str | os.PathLike, name: str | None = None):
    """Load a checkpoint written by :func:`save_reward`; returns ``(name, model)``.

    Raises:
      CheckpointError: not our reward checkpoint, or ``name`` given and different from the stored one.
    """
    from contentv_jax.models.reward import build_reward, canonical_name

    cfg = checkpoints.read_our_config(path)
    stored = cfg.get(REWARD_FORMAT_KEY)
    if stored is None:
        raise CheckpointError(f"{path}: a contentv-jax checkpoint, but not of a reward model (no {REWARD_FORMAT_KEY!r} in config.json)")
    if name is not None and canonical_name(name) != canonical_name(stored):
        raise CheckpointError(f"{path}: holds reward {stored!r}, expected {name!r}")
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(lambda: build_reward(stored, cfg["config"]))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = checkpoints.load_checkpoint(path, params)
    return stored, nnx.merge(graphdef, params, rest)
