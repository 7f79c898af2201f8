"""A training run as a model: ``RUN_DIR/pipeline/``, a complete ContentV directory in diffusers' layout.

``write_pipeline_dir(dst, transformer=..., vae=..., text=..., shift=...)`` writes, through a temporary sibling
renamed into place (never half-written):

- ``transformer/``: ``config.json`` + ``diffusion_pytorch_model.safetensors`` (ContentV's ``SD3Transformer3DModel``
  format, the tensors in their stored dtype), converted from our checkpoint or copied from a diffusers one;
- ``vae/``: the same for the Wan2.1 ``AutoencoderKLWan``;
- ``scheduler/scheduler_config.json``: diffusers' ``FlowMatchEulerDiscreteScheduler`` with the run's sampling
  flow shift (17 unless configured: ContentV report (arXiv 2506.05343), section 5.1);
- ``text_encoder{,_2,_3}/``, ``tokenizer{,_2,_3}/``: symbolic links to what the run used (relative when inside
  the run directory, so the run can be moved), in transformers' own ``save_pretrained`` format;
- ``model_index.json``: as diffusers' ``save_pretrained`` writes it (``_class_name``, ``_diffusers_version``, and
  ``[library, class]`` per component, read from the components' own configs).

So diffusers-based code opens a run as it opens ContentV-8B (e.g. ByteDance's demo:
``ContentVPipeline.from_pretrained(dir, vae=AutoencoderKLWan.from_pretrained(dir, subfolder="vae"),
transformer=SD3Transformer3DModel.from_pretrained(dir, subfolder="transformer"))``), and so does
``contentv_jax.ContentVPipeline.from_pretrained``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from contentv_jax.atomic import atomic_dir

PIPELINE_DIR = "pipeline"
PIPELINE_CLASS = "ContentVPipeline"
SCHEDULER_CLASS = "FlowMatchEulerDiscreteScheduler"
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
TOKENIZERS = ("tokenizer", "tokenizer_2", "tokenizer_3")
# what diffusers records when it is not installed here (the version ContentV's configs were written with)
FALLBACK_DIFFUSERS_VERSION = "0.33.1"


def diffusers_version() -> str:
    """The installed diffusers' version (what its ``save_pretrained`` records), else a fixed recent one."""
    from importlib import metadata

    try:
        return metadata.version("diffusers")
    except metadata.PackageNotFoundError:
        return FALLBACK_DIFFUSERS_VERSION


def scheduler_config(shift: float) -> dict:
    """diffusers' ``FlowMatchEulerDiscreteScheduler`` config with a static flow ``shift`` (as SD3.5's file)."""
    return {"_class_name": SCHEDULER_CLASS, "_diffusers_version": diffusers_version(), "num_train_timesteps": 1000,
            "shift": float(shift)}


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def model_index(model_dir: str | os.PathLike) -> dict:
    """``model_index.json`` of a ContentV directory, the classes read from its components' configs.

    Raises FileNotFoundError naming a component config that is missing.
    """
    d = Path(model_dir)
    index: dict = {"_class_name": PIPELINE_CLASS, "_diffusers_version": diffusers_version()}
    for name in ("scheduler",):
        index[name] = ["diffusers", _read_json(d / name / "scheduler_config.json")["_class_name"]]
    for name in TEXT_ENCODERS:
        index[name] = ["transformers", _read_json(d / name / "config.json")["architectures"][0]]
    for name in TOKENIZERS:
        index[name] = ["transformers", _read_json(d / name / "tokenizer_config.json")["tokenizer_class"]]
    for name in ("transformer", "vae"):
        index[name] = ["diffusers", _read_json(d / name / "config.json")["_class_name"]]
    return dict(sorted(index.items(), key=lambda kv: (not kv[0].startswith("_"), kv[0])))


def _link(src: Path, dst: Path, anchor: Path) -> None:
    """``dst`` -> ``src``: relative when ``src`` lies under ``anchor`` (the run directory), absolute otherwise."""
    src = src.absolute()
    try:
        src.relative_to(anchor.absolute())
        target = os.path.relpath(src, dst.parent.absolute())
    except ValueError:
        target = str(src)
    os.symlink(target, dst, target_is_directory=True)


def _weights(component: str, src: Path, dst: Path) -> None:
    """``dst`` in diffusers' format: converted from our checkpoint, or a copy of a diffusers directory."""
    from contentv_jax.checkpoints import is_our_checkpoint
    from converters.convert import to_diffusers

    if is_our_checkpoint(src):
        to_diffusers(component, src, dst)
    else:
        shutil.copytree(src, dst, symlinks=False)


def write_pipeline_dir(
    dst: str | os.PathLike,
    *,
    transformer: str | os.PathLike,
    vae: str | os.PathLike,
    text: str | os.PathLike,
    shift: float,
    run_dir: str | os.PathLike | None = None,
) -> Path:
    """Write the ContentV directory ``dst`` (see the module docstring), atomically; returns ``Path(dst)``.

    Args:
      transformer: the transformer weights (our checkpoint or a diffusers directory).
      vae: the Wan2.1 VAE (our checkpoint or a diffusers directory).
      text: a directory holding ``text_encoder{,_2,_3}/`` and ``tokenizer{,_2,_3}/`` (linked, not copied).
      shift: the sampling flow shift for ``scheduler/scheduler_config.json``.
      run_dir: links to paths under it are relative (default: ``dst``'s parent).
    Raises:
      FileNotFoundError: a missing text sub-folder (all named) or component config. ``dst`` is untouched then.
    """
    dst, text = Path(dst), Path(text)
    missing = [s for s in (*TEXT_ENCODERS, *TOKENIZERS) if not (text / s).is_dir()]
    if missing:
        raise FileNotFoundError(f"text encoders {text}: missing sub-folder(s) {', '.join(missing)}")
    anchor = Path(run_dir) if run_dir is not None else dst.parent
    with atomic_dir(dst) as tmp:
        _weights("transformer", Path(transformer), tmp / "transformer")
        _weights("vae", Path(vae), tmp / "vae")
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config(shift), indent=2) + "\n")
        for sub in (*TEXT_ENCODERS, *TOKENIZERS):
            _link(text / sub, tmp / sub, anchor)
        (tmp / "model_index.json").write_text(json.dumps(model_index(tmp), indent=2) + "\n")
    return dst
