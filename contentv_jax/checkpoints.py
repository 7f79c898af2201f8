"""Our checkpoint format, and loading either format into our models.

This module is the only code that knows our format: a directory holding our ``config.json`` (the model
config plus ``"_format": "contentv-jax"``) and an Orbax checkpoint of the model's ``nnx.State`` under
``state/``. It saves (atomically: temporary sibling, then rename), loads (whole, or sharded straight
from abstract shapes so that each process reads only the slices its devices hold), exports from
several processes at once, and builds ``MMDiT`` / ``WanVAE`` from our format or from a diffusers
directory (the diffusers side, tensor-name maps and safetensors I/O, lives in ``converters/``).

Import direction: ``checkpoints`` -> ``converters.{common,transformer,vae}`` -> ``models``; the
converter CLIs (``converters.convert``) sit above this module.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from contentv_jax.atomic import commit_dir, tmp_sibling
from contentv_jax.config import ConfigError
from contentv_jax.dtypes import to_dtype
from contentv_jax.sharding.distributed import run_on_main_then_all
from contentv_jax.sharding.init import abstract_sharded
from contentv_jax.sharding.logical import DEFAULT_RULES, LogicalRules
from converters.common import CheckpointError, is_diffusers_dir, open_diffusers_dir

__all__ = [
    "CONFIG_NAME",
    "OUR_FORMAT",
    "STATE_DIR",
    "CheckpointError",
    "export_checkpoint",
    "is_diffusers_dir",
    "is_our_checkpoint",
    "load_checkpoint",
    "load_sharded",
    "load_transformer",
    "load_vae",
    "read_our_config",
    "verify_manifest",
    "write_manifest",
    "run_weights",
    "save_checkpoint",
    "save_handler",
    "stored_abstract_state",
    "transformer_config",
]

OUR_FORMAT = "contentv-jax"
CONFIG_NAME = "config.json"
STATE_DIR = "state"


MANIFEST_NAME = "manifest.json"
_HASH = "sha256"
# Orbax's step metadata (timestamps; no weights) is rewritten when Orbax commits, after the manifest
_UNLISTED = (MANIFEST_NAME, "_CHECKPOINT_METADATA")


def _file_digest(path: Path) -> str:
    import hashlib

    h = hashlib.new(_HASH)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: str | os.PathLike) -> Path:
    """Write ``directory/manifest.json``: size and sha256 of every other file under ``directory``
    (except Orbax's ``_CHECKPOINT_METADATA``, which Orbax rewrites with its commit time).

    Called on a checkpoint's temporary directory once every file is written and before the commit
    rename, so a committed checkpoint always carries the manifest of exactly what was written.
    Returns the manifest's path. The file is written to a temporary name and renamed.
    """
    d = Path(directory)
    files = {}
    for f in sorted(d.rglob("*")):
        if f.is_file() and f.name not in _UNLISTED and not f.name.endswith(".manifest-tmp"):
            files[f.relative_to(d).as_posix()] = {"size": f.stat().st_size, _HASH: _file_digest(f)}
    tmp = d / (MANIFEST_NAME + ".manifest-tmp")
    tmp.write_text(json.dumps({"algorithm": _HASH, "files": files}, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, d / MANIFEST_NAME)
    return d / MANIFEST_NAME


def verify_manifest(directory: str | os.PathLike) -> None:
    """Check every file listed in ``directory/manifest.json`` against its recorded size and sha256.

    Raises:
      CheckpointError: one line naming the checkpoint and the first file that is missing, truncated
        (size differs) or damaged (checksum differs), or a missing / unreadable manifest (a checkpoint
        written before manifests existed can be loaded with ``verify=False``).
    """
    d = Path(directory)
    try:
        manifest = json.loads((d / MANIFEST_NAME).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        raise CheckpointError(f"{d}: no {MANIFEST_NAME} (incomplete, or older than checksums; verify=False skips the check)") from None
    except (OSError, ValueError, KeyError, TypeError):
        raise CheckpointError(f"{d}: {MANIFEST_NAME} is unreadable") from None
    for rel, want in sorted(files.items()):
        f = d / rel
        if not f.is_file():
            raise CheckpointError(f"{d}: file {rel} is missing")
        size = f.stat().st_size
        if size != want["size"]:
            raise CheckpointError(f"{d}: file {rel} is truncated or damaged ({size} bytes, {want['size']} written)")
        if _file_digest(f) != want[_HASH]:
            raise CheckpointError(f"{d}: file {rel} is damaged ({_HASH} checksum differs from the one written)")


def _config_text(config: dict) -> str:
    return json.dumps(dict(config, _format=OUR_FORMAT), indent=2, sort_keys=True) + "\n"


def is_our_checkpoint(path: str | os.PathLike) -> bool:
    """True if ``path`` is a contentv-jax checkpoint directory (our ``config.json`` plus ``state/``)."""
    p = Path(path)
    if not (p.is_dir() and (p / CONFIG_NAME).is_file() and (p / STATE_DIR).is_dir()):
        return False
    try:
        return json.loads((p / CONFIG_NAME).read_text()).get("_format") == OUR_FORMAT
    except (OSError, ValueError):
        return False


# The keys contentv-jax itself writes into a checkpoint's config.json besides the model's config.
METADATA_KEYS = frozenset({"_format", "_exported_weights", "_ema"})


def read_our_config(path: str | os.PathLike) -> dict:
    """The ``config.json`` of our checkpoint, without the keys we add to it (:data:`METADATA_KEYS`: the
    ``_format`` marker, an export's ``_exported_weights`` / ``_ema`` record). Other keys, a diffusers
    config's ``_class_name`` / ``_diffusers_version`` included, are returned as stored.

    Raises:
      CheckpointError: ``path`` is not one of our checkpoints.
    """
    p = Path(path)
    if not is_our_checkpoint(p):
        raise CheckpointError(f"{p}: not a contentv-jax checkpoint (config.json with _format={OUR_FORMAT!r} and state/)")
    cfg = json.loads((p / CONFIG_NAME).read_text())
    return {k: v for k, v in cfg.items() if k not in METADATA_KEYS}


# Orbax writes a jax.Array replicated over R devices replica-parallel (each replica writes 1/R of it), cutting
# it with one eager slice per device, each compiled on first use. For a model's small arrays (norm scales,
# biases and their Adam moments) that costs far more than it saves: the first save of the tiny MM-DiT on a
# (2, 2, 2) mesh of 8 CPU devices took 18.2 s, 0.5 s with this floor (6.2 -> 0.8 s with FSDP over 8). An
# array whose per-replica slice would be smaller is written whole by its first replica; large ones (an 8B
# model's FSDP shards) stay replica-parallel, which is what speeds a pod slice's saves up.
REPLICA_PARALLEL_MIN_BYTES = 1 << 20


def save_handler(multiprocessing_options=None):
    """The Orbax ``PyTreeCheckpointHandler`` of every save of ours (use it with ``ocp.args.PyTreeSave``).

    Its type handlers are Orbax's defaults (those of ``orbax.checkpoint.type_handlers``' global registry, less
    the placeholder type we never save), but ``jax.Array`` is written replica-parallel only in slices of at
    least ``REPLICA_PARALLEL_MIN_BYTES``. The files are those of ``StandardSave``: ``StandardRestore`` reads them.

    Args:
      multiprocessing_options: ``ocp.options.MultiprocessingOptions`` (default: every process takes part).
    Returns:
      a new ``ocp.PyTreeCheckpointHandler`` (one per checkpointer or manager item; it holds no files open).
    """
    import orbax.checkpoint as ocp

    th = ocp.type_handlers
    scalar = th.ScalarHandler()
    registry = th.create_type_handler_registry(
        (int, scalar), (float, scalar), (bytes, scalar), (np.number, scalar), (np.ndarray, th.NumpyHandler()),
        (jax.Array, th.ArrayHandler(min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_BYTES)),
        (str, th.StringHandler()),
    )
    mp = multiprocessing_options or ocp.options.MultiprocessingOptions()
    return ocp.PyTreeCheckpointHandler(type_handler_registry=registry, multiprocessing_options=mp)


def _this_process_options():
    import orbax.checkpoint as ocp

    me = jax.process_index()
    return ocp.options.MultiprocessingOptions(
        primary_host=me, active_processes={me}, barrier_sync_key_prefix=f"process_{me}_alone")


def _this_process_checkpointer():
    """An Orbax ``StandardCheckpointer`` whose barriers involve this process only: a load by one process of
    a multi-process job (the others never join it), e.g. the tiny VAE or a replicated load."""
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer(multiprocessing_options=_this_process_options())


def _save_state(path: Path, state, multiprocessing_options=None) -> None:
    """Write ``state`` (a pytree of arrays) as an Orbax checkpoint at ``path`` with :func:`save_handler`."""
    import orbax.checkpoint as ocp

    mp = multiprocessing_options or ocp.options.MultiprocessingOptions()
    with ocp.Checkpointer(save_handler(mp), multiprocessing_options=mp) as ckptr:
        ckptr.save(path, args=ocp.args.PyTreeSave(state))


def save_checkpoint(dst: str | os.PathLike, state, config: dict) -> None:
    """Save an ``nnx.State`` (or any pytree of arrays) with Orbax plus ``config.json``, atomically.

    Layout: ``dst/config.json`` (``config`` plus ``"_format": "contentv-jax"``) and ``dst/state/`` (Orbax).
    Called by one process (in a multi-process job too: Orbax's barriers are then limited to this process,
    and every array of ``state`` must be addressable here); :func:`export_checkpoint` is the collective form.
    """

    dst = Path(dst).absolute()
    tmp = tmp_sibling(dst)
    if jax.process_count() > 1:  # Orbax refuses host-local jax.Arrays in a multi-process job; NumPy it is
        state = jax.tree.map(lambda x: np.asarray(x) if isinstance(x, jax.Array) else x, state)
    try:
        _save_state(tmp / STATE_DIR, state, _this_process_options())
        (tmp / CONFIG_NAME).write_text(_config_text(config))
        write_manifest(tmp)
        commit_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def export_checkpoint(dst: str | os.PathLike, state, config: dict) -> None:
    """:func:`save_checkpoint` from every process of a multi-host job (one process: the same call).

    Every process writes its shards of ``state/`` into one shared temporary directory (collective:
    call it on all processes with the same ``dst``), then process 0 adds ``config.json`` and renames
    the directory onto ``dst``. A failure on process 0 stops every process (``RuntimeError`` on the others).
    """
    if jax.process_count() == 1:
        save_checkpoint(dst, state, config)
        return
    dst = Path(dst).absolute()
    tmp = dst.with_name(f".{dst.name}.tmp-export")  # one name every process agrees on
    main = jax.process_index() == 0

    def clear():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)

    run_on_main_then_all("export", clear if main else None)
    _save_state(tmp / STATE_DIR, state)  # collective: each process writes its shards

    def commit():  # every process's shards are written (the collective save returned everywhere)
        (tmp / CONFIG_NAME).write_text(_config_text(config))
        write_manifest(tmp)
        commit_dir(tmp, dst)

    run_on_main_then_all("export commit", commit if main else None)


def load_checkpoint(path: str | os.PathLike, abstract_state, *, verify: bool = True, this_process_only: bool = False):
    """Restore the state saved by :func:`save_checkpoint`.

    Args:
      path: our checkpoint directory.
      abstract_state: the target structure (e.g. ``nnx.state(nnx.eval_shape(...))``) of
        ``jax.ShapeDtypeStruct`` leaves; their dtypes and shardings are honoured.
    Returns:
      the restored state (same structure as ``abstract_state``); read the config with
      :func:`read_our_config`.
      verify: check every file against the checkpoint's manifest first (:func:`verify_manifest`);
        False skips it (faster for large checkpoints on trusted storage).
      this_process_only: a read by this process alone in a multi-process job (every leaf of
        ``abstract_state`` on this process's devices), e.g. the replicated VAE; the default is collective.
    Raises:
      CheckpointError: ``path`` is not one of our checkpoints, or (``verify``) a file is missing,
        truncated or damaged (named).
    """
    import orbax.checkpoint as ocp

    read_our_config(path)
    if verify:
        verify_manifest(path)
    ckptr = _this_process_checkpointer() if this_process_only else ocp.StandardCheckpointer()
    try:
        state = ckptr.restore(Path(path).absolute() / STATE_DIR, abstract_state)
    finally:
        ckptr.close()
    return state


def stored_abstract_state(path: str | os.PathLike, abstract_state: nnx.State) -> nnx.State:
    """``abstract_state`` with each leaf's dtype set to the one stored in our checkpoint at ``path``
    (from the Orbax metadata), so that :func:`load_checkpoint` keeps the bytes as written.

    Raises:
      CheckpointError: ``path`` is not our checkpoint, or a parameter is missing or mis-shaped there
        (named, with expected and found shape).
    """

    read_our_config(path)
    with _this_process_checkpointer() as ckptr:
        meta = ckptr.metadata(Path(path).absolute() / STATE_DIR)
    meta_tree = getattr(meta, "item_metadata", meta)
    stored = {}
    for keypath, m in jax.tree.leaves_with_path(meta_tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype")):
        keys = tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in keypath)
        stored[keys[:-1] if keys[-1] == "value" else keys] = m
    for p, var in nnx.to_flat_state(abstract_state):
        m = stored.get(tuple(str(k) for k in p))
        want = tuple(var.get_value().shape)
        if m is None or tuple(m.shape) != want:
            raise CheckpointError(
                f"{path}: parameter {'.'.join(map(str, p))}: expected shape {want}, "
                f"found {None if m is None else tuple(m.shape)}"
            )
        var.set_value(jax.ShapeDtypeStruct(tuple(m.shape), m.dtype))
    return abstract_state


def load_sharded(
    path: str | os.PathLike, factory: Callable[[], nnx.Module], mesh, rules: LogicalRules = DEFAULT_RULES,
    *, verify: bool = True,
) -> nnx.Module:
    """Restore our Orbax checkpoint of ``factory()``'s state directly into its shardings on ``mesh``.

    Args:
      path: our checkpoint directory (``config.json`` + ``state/``), or an Orbax directory of the
        ``nnx.State`` itself.
      factory: builds the module the checkpoint was saved from (only traced, via ``nnx.eval_shape``).
      mesh, rules: where the parameters' logical names put them.
    Returns:
      the module with each array restored into its ``sharding.init.state_shardings`` sharding; every
      process reads only the slices its own devices hold.
    Raises:
      FileNotFoundError: ``path`` does not exist.
      CheckpointError: (``verify``, our checkpoints) a file is missing, truncated or damaged (named).
      ValueError (from Orbax): the checkpoint's tree or shapes do not match ``factory()``'s.
    """
    import orbax.checkpoint as ocp

    p = Path(path).absolute()
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {p} does not exist")
    if (p / STATE_DIR).is_dir():
        if verify and is_our_checkpoint(p):
            verify_manifest(p)  # every process checks the files (they share one file system)
        p = p / STATE_DIR
    graphdef, target, _ = abstract_sharded(factory, mesh, rules)
    with ocp.StandardCheckpointer() as ckptr:
        state = ckptr.restore(p, target)
    return nnx.merge(graphdef, state)


def load_transformer(path: str | os.PathLike, *, dtype: str | None = None, param_dtype: str | None = None,
                     verify: bool = True, **overrides):
    """Load ``MMDiT`` from a diffusers-format directory or from our converted checkpoint.

    Args:
      path: a diffusers transformer directory (config.json + safetensors, possibly sharded; SD3.5 Large's
        2D ``pos_embed.pos_embed`` table is dropped with a logged note) or our checkpoint
        (``python -m converters.from_diffusers --component transformer`` output).
      dtype: compute dtype name (default: the checkpoint's config, or float32 for diffusers dirs).
      param_dtype: parameters are cast to this dtype (default: as stored).
      verify: check our checkpoint's files against its manifest (:func:`verify_manifest`); False skips it.
      overrides: other ``TransformerConfig`` fields (``remat_policy``, ``attention_kernel``).
    Raises:
      CheckpointError: the checkpoint does not match its config, or a file is missing, truncated or
        damaged (named).
      FileNotFoundError: ``path`` is neither format.
    """
    from contentv_jax.models.transformer import DTYPES, TransformerConfig, abstract_model
    from converters import transformer as conv

    if is_our_checkpoint(path):
        cfg = TransformerConfig.from_dict(read_our_config(path))
        cfg = cfg.replace(**overrides, **({"dtype": dtype} if dtype else {}))
        graphdef, abstract_state = nnx.split(abstract_model(cfg))
        model = nnx.merge(graphdef, load_checkpoint(path, abstract_state, verify=verify))
    elif is_diffusers_dir(path):
        model = conv.load_diffusers(path, dtype=dtype or "float32", **overrides)
    else:
        raise FileNotFoundError(f"{path}: neither a diffusers transformer directory nor a contentv-jax checkpoint")
    if param_dtype is not None and param_dtype != model.config.param_dtype:
        target = DTYPES[param_dtype]
        graphdef, state = nnx.split(model)
        state = jax.tree.map(lambda a: a.astype(target), state)
        model = nnx.merge(graphdef, state)
        model.config = model.config.replace(param_dtype=param_dtype)
    return model


def load_vae(path: str | os.PathLike, *, param_dtype="float32", verify: bool = True):
    """Load a ``WanVAE`` from a diffusers-format VAE directory or our (Orbax) checkpoint.

    Args:
      path: a directory with ``config.json`` and ``diffusion_pytorch_model*.safetensors`` (diffusers
        ``AutoencoderKLWan.save_pretrained``), or a checkpoint written by
        ``python -m converters.from_diffusers --component vae``.
      param_dtype: the parameters' dtype (a name of ``contentv_jax.dtypes.DTYPES`` or a dtype), as
        ``param_dtype`` in :func:`load_transformer`; the VAE computes in its input's dtype.
      verify: check our checkpoint's files against its manifest (:func:`verify_manifest`); False skips it.
    Raises:
      FileNotFoundError: ``path`` is not a directory.
      ValueError: neither format, or tensors missing / unexpected / mis-shaped
        (``CheckpointError`` names each).
    """
    from contentv_jax.models.vae import VAEConfig, abstract_vae
    from converters import vae as vae_conv

    dtype = to_dtype(param_dtype, "load_vae: param_dtype")
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"load_vae: {path!r} is not a directory")
    if is_our_checkpoint(path):
        config = VAEConfig.from_diffusers(read_our_config(path))
        graphdef, abs_state = nnx.split(abstract_vae(config, dtype))
        # every process reads the whole (small, replicated) VAE itself: no collective, so one process may load it
        state = load_checkpoint(path, abs_state, verify=verify, this_process_only=True)
        state = jax.tree.map(lambda a: jnp.asarray(a, dtype), state)
        return nnx.merge(graphdef, state)
    if is_diffusers_dir(path):
        cfg_dict, tensors = open_diffusers_dir(path)
        config = VAEConfig.from_diffusers(cfg_dict)
        return vae_conv.model_from_tensors(config, tensors, param_dtype=dtype)
    raise ValueError(
        f"load_vae: {path!r} is neither a diffusers VAE directory (config.json + diffusion_pytorch_model*.safetensors) "
        "nor a contentv-jax checkpoint"
    )


def transformer_config(model_section: Any):
    """The ``TransformerConfig`` a training config's ``model`` section names, and where its weights come from.

    Args:
      model_section: ``name`` (a named config), ``init`` (``random``, or a checkpoint directory in our
        format or diffusers'; its config wins over ``name``), ``dtype`` (compute), ``remat_policy``
        (empty: the config's), ``attention_kernel`` (``auto`` or a kernel name; it replaces a loaded
        checkpoint's), ``latent_channels`` (0: the config's ``in_channels``). The trainer and
        ``bench/scale_plan.py`` both build their model from this, so a plan measures what a run runs.
    Returns:
      ``(TransformerConfig with float32 parameters, source)``; ``source`` is ``"random"``, ``"ours"``
      or ``"diffusers"``.
    Raises:
      ConfigError: naming ``model.name``, ``model.init`` or ``model.remat_policy``.
    """
    from contentv_jax.models import transformer as T

    m = model_section
    ov = {"dtype": m.dtype, "param_dtype": "float32", "attention_kernel": m.attention_kernel}
    if m.remat_policy:
        if m.remat_policy not in T.REMAT_POLICIES:
            raise ConfigError(
                f"config key 'model.remat_policy': {m.remat_policy!r} is not one of {sorted(T.REMAT_POLICIES)}"
            )
        ov["remat_policy"] = m.remat_policy
    if m.latent_channels:
        ov["in_channels"] = ov["out_channels"] = m.latent_channels
    if m.init == "random":
        try:
            return T.get_config(m.name, **ov), "random"
        except ConfigError as e:
            raise ConfigError(f"config key 'model.name': {e}") from None
    path = Path(m.init)
    if is_our_checkpoint(path):
        return T.TransformerConfig.from_dict(read_our_config(path)).replace(**ov), "ours"
    if is_diffusers_dir(path):
        raw = json.loads((path / CONFIG_NAME).read_text())
        return T.TransformerConfig.from_diffusers_config(raw, **ov), "diffusers"
    raise ConfigError(
        f"config key 'model.init': {m.init!r} is neither 'random' nor a transformer checkpoint "
        "(a diffusers directory or a contentv-jax checkpoint)"
    )


def run_weights(run_dir: str | os.PathLike) -> Path:
    """The exported transformer of a training run: ``run_dir/transformer`` (our format), or ``run_dir``
    itself when it is a transformer checkpoint (ours or diffusers').

    Raises:
      FileNotFoundError: naming what was looked for.
    """
    p = Path(run_dir)
    for cand in (p / "transformer", p):
        if is_our_checkpoint(cand) or is_diffusers_dir(cand):
            return cand
    raise FileNotFoundError(
        f"{p}: no transformer weights (looked for {p / 'transformer'} and {p} as a contentv-jax or diffusers checkpoint)"
    )
