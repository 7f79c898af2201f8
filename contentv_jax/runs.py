"""What a training run directory holds, and how a model directory or a run resolves to the weights to sample.

A run directory (``python -m contentv_jax.train``)::

    RUN_DIR/config.yaml           the resolved training config
    RUN_DIR/model_config.json     the transformer's config (our TransformerConfig fields), written at setup
    RUN_DIR/checkpoints/STEP/     Orbax training checkpoints: items ``state`` (leaves under index keys),
                                  ``data`` (the data position) and ``paths`` (each leaf's key path)
    RUN_DIR/transformer/          the exported weights (EMA when enabled), our checkpoint format
    RUN_DIR/pipeline/             a complete ContentV directory in diffusers' layout (``contentv_jax.train.export``)
    RUN_DIR/assets/{vae,text}/    the tiny random VAE / text encoders when the config names none
    RUN_DIR/samples/STEP/         the videos sampled while training (``logging.sample_every``)

:func:`resolve` accepts a run directory, its ``pipeline/``, a diffusers ContentV directory or our converted
one, and gives the parts to load; ``checkpoint=STEP`` picks an intermediate training checkpoint of a run.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

CONFIG_YAML = "config.yaml"
MODEL_CONFIG = "model_config.json"
CHECKPOINTS = "checkpoints"
EXPORT = "transformer"
PIPELINE = "pipeline"
SAMPLES = "samples"
ASSETS = "assets"
TEXT_SUBFOLDERS = ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")
# the training checkpoint's items (contentv_jax.train.checkpoint.TrainCheckpointer)
STATE_ITEM, DATA_ITEM, PATHS_ITEM = "state", "data", "paths"


@dataclasses.dataclass
class ModelSource:
    """The parts of a model to load, as :func:`resolve` found them.

    ``transformer``: a transformer checkpoint directory (ours or diffusers'), or None when the weights come from
    ``checkpoint`` (a training checkpoint ``RUN_DIR/checkpoints/STEP``, read by :func:`load_checkpoint_transformer`).
    ``vae``, ``text`` (a directory holding ``text_encoder{,_2,_3}/`` and ``tokenizer{,_2,_3}/``): None when absent.
    ``scheduler_config``: the diffusers scheduler config, if any; ``shift``: the run's sampling shift, if known.
    """

    kind: str  # "model dir" or "run"
    root: Path
    transformer: Path | None = None
    vae: Path | None = None
    text: Path | None = None
    scheduler_config: Path | None = None
    shift: float | None = None
    checkpoint: Path | None = None
    step: int | None = None
    run_dir: Path | None = None

    @property
    def transformer_config(self) -> Path:
        """The transformer's ``config.json`` (``RUN_DIR/model_config.json`` for a training checkpoint)."""
        if self.transformer is not None:
            return self.transformer / "config.json"
        return self.run_dir / MODEL_CONFIG


def is_run_dir(path: str | os.PathLike) -> bool:
    """A training run directory: ``config.yaml`` plus checkpoints, exported weights or a ``pipeline/``."""
    p = Path(path)
    return (p / CONFIG_YAML).is_file() and any((p / d).is_dir() for d in (CHECKPOINTS, EXPORT, PIPELINE))


def is_model_dir(path: str | os.PathLike) -> bool:
    """A ContentV directory (diffusers' layout or our converted one): ``transformer/config.json``."""
    return (Path(path) / "transformer" / "config.json").is_file()


def read_run_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    """``RUN_DIR/config.yaml`` as plain nested dicts."""
    import yaml

    return yaml.safe_load((Path(run_dir) / CONFIG_YAML).read_text()) or {}


def checkpoint_steps(run_dir: str | os.PathLike) -> list[int]:
    """The committed training-checkpoint steps of a run, ascending (Orbax renames a step into place when done)."""
    d = Path(run_dir) / CHECKPOINTS
    if not d.is_dir():
        return []
    return sorted(int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit() and (p / STATE_ITEM).is_dir())


def run_assets(run_dir: Path, cfg: dict[str, Any]) -> tuple[Path | None, Path | None]:
    """The VAE and text-encoder directories a run used (``vae.path`` / ``text.path`` or its ``assets/``)."""
    def pick(section: str, default: Path) -> Path | None:
        given = (cfg.get(section) or {}).get("path") or ""
        p = Path(given) if given else default
        return p if p.is_dir() else None

    return pick("vae", run_dir / ASSETS / "vae"), pick("text", run_dir / ASSETS / "text")


def _model_dir_source(root: Path, kind: str = "model dir") -> ModelSource:
    text = root if all((root / s).is_dir() for s in TEXT_SUBFOLDERS) else None
    sched = root / "scheduler" / "scheduler_config.json"
    return ModelSource(
        kind=kind, root=root, transformer=root / "transformer", vae=root / "vae" if (root / "vae").is_dir() else None,
        text=text, scheduler_config=sched if sched.is_file() else None,
    )


def resolve(path: str | os.PathLike, checkpoint: int | None = None) -> ModelSource:
    """What to load for ``path``: a run directory, ``RUN_DIR/pipeline``, a diffusers ContentV directory or ours.

    A run without ``checkpoint`` gives its ``pipeline/`` when complete, else its exported ``transformer/`` with the
    VAE and text encoders it used, else its latest training checkpoint. ``checkpoint=STEP`` gives that training
    checkpoint of the run (its EMA weights when the run keeps an EMA).

    Raises:
      FileNotFoundError: ``path`` is none of the accepted kinds, or a run has no weights: the message lists
        every place looked at. ValueError: ``checkpoint`` given for a model directory, or a step the run does
        not have (the message lists the steps it has).
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"model {root} does not exist")
    if not is_run_dir(root):
        if checkpoint is not None:
            raise ValueError(f"checkpoint={checkpoint} needs a training run directory; {root} has no {CONFIG_YAML}")
        if is_model_dir(root):
            return _model_dir_source(root)
        raise FileNotFoundError(
            f"{root} is not a model: looked for {root / 'transformer' / 'config.json'} (a ContentV directory, diffusers' "
            f"layout or ours) and for {root / CONFIG_YAML} with {CHECKPOINTS}/, {EXPORT}/ or {PIPELINE}/ (a training run)"
        )
    cfg = read_run_config(root)
    shift = (cfg.get("sampling") or {}).get("shift")
    vae, text = run_assets(root, cfg)
    pipeline = root / PIPELINE
    steps = checkpoint_steps(root)
    if checkpoint is not None:
        if int(checkpoint) not in steps:
            raise ValueError(
                f"run {root} has no checkpoint {checkpoint}; its checkpoints: {steps or 'none'} (under {root / CHECKPOINTS})"
            )
        step = int(checkpoint)
    elif (pipeline / "model_index.json").is_file() and is_model_dir(pipeline):
        src = _model_dir_source(pipeline, kind="run")
        src.run_dir, src.shift = root, shift
        return src
    elif (root / EXPORT / "config.json").is_file():
        return ModelSource(kind="run", root=root, transformer=root / EXPORT, vae=vae, text=text, shift=shift, run_dir=root)
    elif steps:
        step = steps[-1]
    else:
        raise FileNotFoundError(
            f"run {root} has no weights to sample: looked for {pipeline / 'model_index.json'}, "
            f"{root / EXPORT / 'config.json'} and checkpoints under {root / CHECKPOINTS}"
        )
    if not (root / MODEL_CONFIG).is_file():
        raise FileNotFoundError(f"run {root}: {root / MODEL_CONFIG} is missing (the transformer config of its checkpoints)")
    if (pipeline / "vae").is_dir():
        vae = pipeline / "vae"
    if all((pipeline / s).is_dir() for s in TEXT_SUBFOLDERS):
        text = pipeline
    return ModelSource(kind="run", root=root, vae=vae, text=text, shift=shift, checkpoint=root / CHECKPOINTS / str(step),
                       step=step, run_dir=root)


def _open_manager(step_dir: Path, items: tuple[str, ...]):
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(Path(step_dir).absolute().parent, item_names=items)


def checkpoint_weight_paths(step_dir: str | os.PathLike) -> tuple[str, dict[str, tuple[str, ...]]]:
    """``(which, {leaf key: parameter path})`` of the weights a training checkpoint would export: ``which`` is
    ``"ema"`` when it holds an EMA of the parameters, else ``"params"``; a parameter path is the key path in the
    model's ``nnx`` pure dict (``("transformer_blocks", "attn", "to_q", "kernel")``)."""
    import orbax.checkpoint as ocp

    step_dir = Path(step_dir)
    with _open_manager(step_dir, (PATHS_ITEM,)) as manager:
        paths = manager.restore(int(step_dir.name), args=ocp.args.Composite(**{PATHS_ITEM: ocp.args.JsonRestore()}))
    paths = paths[PATHS_ITEM]["paths"]
    which = "ema" if any(p and p[0] == "ema" for p in paths) else "params"
    return which, {f"{i:06d}": tuple(p[1:]) for i, p in enumerate(paths) if p and p[0] == which}


def load_checkpoint_transformer(src: ModelSource, *, dtype: str | None = None, **overrides):
    """The MM-DiT of a training checkpoint (:attr:`ModelSource.checkpoint`), with its EMA weights when present.

    Only the weights are read (a partial Orbax restore), never the optimizer state. ``dtype``: compute and
    parameter dtype (None: the run's compute dtype with float32 parameters, as trained).

    Raises:
      ValueError: the checkpoint's weights do not cover the model of ``model_config.json`` (named).
    """
    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp
    from flax import nnx, traverse_util

    from contentv_jax.models import transformer as T

    cfg = T.TransformerConfig.from_dict(json.loads((src.run_dir / MODEL_CONFIG).read_text()))
    cfg = cfg.replace(param_dtype="float32", **overrides)
    if dtype is not None:
        cfg = cfg.replace(dtype=dtype, param_dtype=dtype)
    graphdef, params, rest = nnx.split(T.abstract_model(cfg), nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise ValueError("the model holds state besides its parameters; a training checkpoint keeps only parameters")
    flat = {tuple(str(k) for k in path): v for path, v in traverse_util.flatten_dict(nnx.to_pure_dict(params)).items()}
    which, keys = checkpoint_weight_paths(src.checkpoint)
    missing = sorted(set(flat) - set(keys.values()))
    if missing:
        raise ValueError(
            f"checkpoint {src.checkpoint}: its {which} lack {len(missing)} parameters of {src.run_dir / MODEL_CONFIG}, "
            f"e.g. {['/'.join(m) for m in missing[:3]]}"
        )
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = {k: jax.ShapeDtypeStruct(flat[p].shape, jnp.float32) for k, p in keys.items() if p in flat}
    restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(dtype=x.dtype, sharding=device), abstract)
    with _open_manager(src.checkpoint, (STATE_ITEM,)) as manager:
        restored = manager.restore(src.step, args=ocp.args.Composite(**{
            STATE_ITEM: ocp.args.PyTreeRestore(abstract, restore_args=restore_args, partial_restore=True)
        }))[STATE_ITEM]
    pdtype = jnp.dtype(cfg.param_dtype)
    pure = nnx.to_pure_dict(params)
    by_str = {tuple(str(k) for k in path): path for path in traverse_util.flatten_dict(pure)}
    values = {by_str[p]: jnp.asarray(restored[k], pdtype) for k, p in keys.items() if p in by_str}
    nnx.replace_by_pure_dict(params, traverse_util.unflatten_dict(values))
    return nnx.merge(graphdef, params)
