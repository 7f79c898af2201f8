"""``python -m contentv_jax.sample``: text -> video with a ContentV checkpoint, like the official ``demo.py``.

Examples::

    python -m contentv_jax.sample --model runs/tiny --prompt "a red circle moving right" --out a.mp4
    python -m contentv_jax.sample --model runs/tiny --checkpoint 100 --prompt "a red circle moving right" --out b.mp4
    python -m contentv_jax.sample --model ContentV-8B --prompt "A young musician ..." --out video.mp4
    python -m contentv_jax.sample --model ContentV-8B --prompts-file scene.txt --out videos/ --videos-per-prompt 5
    python -m contentv_jax.sample --model ContentV-8B --prompt "..." mesh.fsdp=1 mesh.sequence=4 --chunked-attention

Defaults are the official pipeline's (github bytedance/ContentV ``contentv_pipeline.py`` / ``demo.py``):
125 frames, 432x768, 50 steps, guidance 6.0, the demo's negative prompt, 24 fps, flow shift from the model
directory's ``scheduler/scheduler_config.json`` (a run's ``sampling.shift``; else 17), transformer in bfloat16, VAE
in float32. ``--model`` is a training run directory (its ``pipeline/``, else its exported weights, else its latest
checkpoint; ``--checkpoint STEP`` picks a training checkpoint), a run's ``pipeline/``, a diffusers ContentV
directory or our converted one (``contentv_jax.runs.resolve``). The CLI is a thin layer over
:class:`contentv_jax.pipeline.ContentVPipeline` (``from contentv_jax import ContentVPipeline``): the same call
gives the same frames.

Outputs (``--output-type``): ``mp4`` (one file per video), ``frames`` (float32 .npy (B, F, H, W, 3) in [0, 1]),
``latent`` (float32 .npy (B, T, H/8, W/8, C), the final normalised latents). With ``--prompts-file`` every line is
a prompt and ``--out`` a directory: VBench names, ``<prompt>-<index>.mp4`` (``.npy`` per prompt otherwise), or
``<name>-<index>.mp4`` with ``--names-file`` (one name per prompt line: VBench's short prompts for its long
GPT-enhanced ones, as its evaluation expects). Names longer than :data:`NAME_MAX_BYTES` (200 bytes, under the
255-byte file-system limit) keep a readable prefix plus a hash (:func:`safe_file_name`); ``prompts.json`` beside
the videos maps each file name to the prompt it was sampled from. Every file is written to a temporary sibling and moved into place.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

import numpy as np

from contentv_jax import pipeline as pl
from contentv_jax.atomic import atomic_file
from contentv_jax.outputs import NAME_MAX_BYTES, safe_file_name, vbench_name, write_prompt_map  # noqa: F401
from contentv_jax.config import ConfigError, apply_overrides
from contentv_jax.dtypes import NAMES as DTYPE_NAMES
from contentv_jax.sharding.mesh import MeshConfig

logger = logging.getLogger("contentv_jax.sample")



def build_parser() -> argparse.ArgumentParser:
    """The ``argparse`` parser of ``python -m contentv_jax.sample`` (flags close to the official demo)."""
    p = argparse.ArgumentParser(
        prog="python -m contentv_jax.sample",
        description="Sample videos from a ContentV checkpoint (flow-shift Euler with classifier-free guidance).",
        epilog="Trailing mesh.data=N mesh.fsdp=N mesh.sequence=N set the device mesh (sequence > 1: Ulysses).",
    )
    p.add_argument("--model", required=True, help="a training run directory (python -m contentv_jax.train), its "
                   "pipeline/, or a ContentV directory: transformer/, vae/, scheduler/, text_encoder{,_2,_3}/, "
                   "tokenizer{,_2,_3}/ (diffusers layout or our converted checkpoints)")
    p.add_argument("--checkpoint", type=int, default=None, metavar="STEP",
                   help="sample the run's training checkpoint of this step (its EMA weights when it keeps one)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="the text prompt")
    src.add_argument("--prompts-file", type=Path, help="one prompt per line; one video per line and index")
    src.add_argument("--prompt-embeds", type=Path, help=".npz with prompt_embeds, pooled_prompt_embeds, "
                     "negative_prompt_embeds, negative_pooled_prompt_embeds (no text encoder is loaded)")
    p.add_argument("--negative-prompt", default=None, help="default: the official demo's negative prompt")
    p.add_argument("--num-frames", type=int, default=125, help="rounded down to 4k+1 with a warning")
    p.add_argument("--height", type=int, default=432, help="multiple of 16")
    p.add_argument("--width", type=int, default=768, help="multiple of 16")
    p.add_argument("--steps", "--num-inference-steps", dest="steps", type=int, default=50, help="Euler steps")
    p.add_argument("--guidance-scale", type=float, default=6.0, help="CFG weight; <= 1 disables guidance")
    p.add_argument("--shift", type=float, default=None, help="flow shift (default: scheduler config, else 17)")
    p.add_argument("--seed", type=int, default=42, help="noise seed (torch CPU generator, as the official demo)")
    p.add_argument("--fps", type=float, default=24.0)
    p.add_argument("--out", type=Path, default=None, help="output file (a directory with --prompts-file); "
                   "default video.mp4 / video.npy / videos/")
    p.add_argument("--output-type", choices=("mp4", "frames", "latent"), default="mp4")
    p.add_argument("--latents", type=Path, help="initial noise .npy (B, T, H/8, W/8, C) instead of --seed")
    p.add_argument("--videos-per-prompt", type=int, default=1)
    p.add_argument("--max-sequence-length", type=int, default=pl.MAX_SEQUENCE_LENGTH,
                   help="T5 tokens (256 for ContentV; use what the model was trained with)")
    p.add_argument("--names-file", type=Path, default=None,
                   help="one output name per line of --prompts-file, same order (e.g. VBench's short prompts for "
                        "its long prompts); default: the prompt itself")
    p.add_argument("--max-prompts", type=int, default=None, help="only the first N lines of --prompts-file")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="bfloat16", help="transformer dtype (VAE: float32)")
    p.add_argument("--text-encoder-dtype", choices=DTYPE_NAMES, default="float32",
                   help="dtype of the three text encoders (the official demo: bfloat16)")
    p.add_argument("--text-encoder-device", default="cpu",
                   help="torch device of the text encoders: cpu, cuda, cuda:N, npu, npu:N, or auto")
    mem = p.add_argument_group("memory")
    mem.add_argument("--vae-tiling", action="store_true", help="decode in spatial tiles")
    mem.add_argument("--chunked-attention", action="store_true", help="online-softmax attention in chunks")
    mem.add_argument("--attention-kernel", default=None,
                     help="auto | xla | cudnn | splash | chunked (default auto: cuDNN flash on GPU, splash on TPU, "
                          "chunked on CPU; overrides --chunked-attention)")
    mem.add_argument("--offload", action="store_true",
                     help="keep parameters in host memory; each model goes to the device only while it runs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", help="mesh.data=.. mesh.fsdp=.. mesh.sequence=..")
    return p


def _read_lines(path: Path, flag: str) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"{flag} {path} does not exist")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{flag} {path} has no lines")
    return lines


def read_prompts(prompts_file: Path, names_file: Path | None = None, limit: int | None = None) -> tuple[list[str], list[str]]:
    """``(prompts, names)`` of a prompts file (one prompt per non-blank line) and its optional names file.

    The names file (one name per non-blank line, the same order: e.g. VBench's short prompts for its
    GPT-enhanced long prompts) must have as many lines as the prompts file; without one a prompt is its own
    name. ``limit`` keeps the first lines of both.

    Raises:
      FileNotFoundError: a missing file. ValueError: an empty file, or a line-count mismatch (both counts named).
    """
    prompts = _read_lines(prompts_file, "--prompts-file")
    names = prompts
    if names_file is not None:
        names = _read_lines(names_file, "--names-file")
        if len(names) != len(prompts):
            raise ValueError(
                f"--names-file {names_file} has {len(names)} names, --prompts-file {prompts_file} has "
                f"{len(prompts)} prompts; they must match line for line"
            )
    if limit is not None:
        if limit < 1:
            raise ValueError(f"--max-prompts must be >= 1, got {limit}")
        prompts, names = prompts[:limit], names[:limit]
    return prompts, names


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_file(path, suffix=".npy") as tmp:
        np.save(tmp, array)


def _write_outputs(result: np.ndarray, output_type: str, names: list[Path], npy_path: Path, fps: float) -> list[Path]:
    if output_type != "mp4":
        _save_npy(npy_path, result)
        return [npy_path]
    return [Path(pl.export_to_video(video, path, fps=fps)) for path, video in zip(names, result)]


def main(argv: list[str] | None = None) -> int:
    """CLI entry point of ``python -m contentv_jax.sample``; returns the exit status (0 ok, 2 bad input, named on stderr before any compute)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # ---- every check before anything heavy is loaded or computed
    if args.prompt is None and args.prompts_file is None and args.prompt_embeds is None:
        print("error: give --prompt, --prompts-file or --prompt-embeds", file=sys.stderr)
        return 2
    try:
        if args.names_file is not None and args.prompts_file is None:
            raise ValueError("--names-file names the lines of --prompts-file; give --prompts-file too")
        mesh_cfg = _mesh_config(args.overrides)
        pl.check_video_size(args.height, args.width)
        num_frames = pl.round_num_frames(args.num_frames)
        if args.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {args.steps}")
        if args.videos_per_prompt < 1:
            raise ValueError(f"--videos-per-prompt must be >= 1, got {args.videos_per_prompt}")
        if args.max_sequence_length < 1:
            raise ValueError(f"--max-sequence-length must be >= 1, got {args.max_sequence_length}")
        if args.fps <= 0:
            raise ValueError(f"--fps must be positive, got {args.fps}")
        kernel = args.attention_kernel or ("chunked" if args.chunked_attention else "auto")
        from contentv_jax.models.attention import KERNEL_CHOICES, resolve_kernel

        if kernel not in KERNEL_CHOICES:
            raise ValueError(f"--attention-kernel {kernel!r} is not one of {KERNEL_CHOICES}")
        try:  # refused here, before anything loads or compiles, when it cannot run on this backend
            resolve_kernel(kernel, dtype=args.dtype)
        except ValueError as e:
            raise ValueError(f"--attention-kernel: {e}") from None
        need_text = args.prompt_embeds is None
        src = pl.ContentVPipeline.check_model_dir(args.model, need_text=need_text, need_vae=args.output_type != "latent",
                                                  checkpoint=args.checkpoint)
        dims = pl.transformer_dims(src.transformer_config)
        guidance = args.guidance_scale > 1.0
        embeds = None
        if args.prompt_embeds is not None:
            embeds = pl.PromptEmbeds.load(args.prompt_embeds)
            embeds.validate(dims["context_dim"], dims["pooled_dim"], guidance)
        names = None
        if args.prompts_file is not None:
            prompts, names = read_prompts(args.prompts_file, args.names_file, args.max_prompts)
        else:
            prompts = None if args.prompt is None else [args.prompt]
        latents = None
        if args.latents is not None:
            if args.prompts_file is not None:
                raise ValueError("--latents cannot be combined with --prompts-file (one noise tensor per run)")
            latents = np.load(args.latents).astype(np.float32)
            batch = (1 if embeds is None else embeds.batch) * args.videos_per_prompt
            want = pl.latent_shape(batch, num_frames, args.height, args.width, dims["in_channels"])
            if latents.shape != want:
                raise ValueError(f"--latents {args.latents} must have shape {want}, got {latents.shape}")
        if need_text:
            from contentv_jax.text import torch_device, torch_dtype

            torch_dtype(args.text_encoder_dtype)
            torch_device(args.text_encoder_device)
    except (ValueError, FileNotFoundError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    mesh = None
    if mesh_cfg is not None:
        from contentv_jax.sharding.mesh import create_mesh

        mesh = create_mesh(mesh_cfg)
        logger.info("mesh %s", dict(mesh.shape))
    pipe = pl.ContentVPipeline.from_pretrained(
        args.model,
        dtype=args.dtype,
        mesh=mesh,
        attention_kernel=kernel,
        vae_tiling=args.vae_tiling,
        offload=args.offload,
        shift=args.shift,
        checkpoint=args.checkpoint,
        load_text_encoders=need_text,
        load_vae=args.output_type != "latent",
        text_encoder_dtype=args.text_encoder_dtype,
        text_encoder_device=args.text_encoder_device,
    )
    pipe.set_progress_bar_config(disable=args.no_progress)
    logger.info("flow shift %.3g, %d frames, %dx%d, %d steps, guidance %.3g",
                pipe.shift, num_frames, args.height, args.width, args.steps, args.guidance_scale)
    common = dict(
        negative_prompt=args.negative_prompt, num_frames=num_frames, height=args.height, width=args.width,
        num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
        num_videos_per_prompt=args.videos_per_prompt, max_sequence_length=args.max_sequence_length,
        output_type="latent" if args.output_type == "latent" else "np",
    )
    suffix = ".mp4" if args.output_type == "mp4" else ".npy"
    written: list[Path] = []
    if args.prompts_file is not None:
        out_dir = args.out or Path("videos")
        mapping: dict[str, str] = {}
        for i, (prompt, name) in enumerate(zip(prompts, names)):
            logger.info("[%d/%d] %s", i + 1, len(prompts), name)
            result = pipe(prompt=prompt, seed=args.seed + i, **common).frames
            files = [out_dir / vbench_name(name, k, suffix) for k in range(len(result))]
            npy_path = out_dir / safe_file_name(name, suffix)
            written += _write_outputs(result, args.output_type, files, npy_path, args.fps)
            mapping.update({p.name: prompt for p in (files if args.output_type == "mp4" else [npy_path])})
            write_prompt_map(out_dir, mapping)  # after every prompt: an interrupted run keeps what it wrote
    else:
        out = args.out or Path("video" + suffix)
        embed_kwargs = {} if embeds is None else embeds.as_kwargs()
        result = pipe(prompt=None if prompts is None else prompts[0], seed=args.seed, latents=latents,
                      **embed_kwargs, **common).frames
        files = [out] if len(result) == 1 else [out.with_name(f"{out.stem}-{k}{out.suffix}") for k in range(len(result))]
        written += _write_outputs(result, args.output_type, files, out, args.fps)
    for path in written:
        print(path)
    return 0


@dataclasses.dataclass
class SampleOverrides:
    """What ``key=value`` arguments may set: the device mesh (``mesh.data``, ``mesh.fsdp``, ``mesh.sequence``)."""

    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)


def _mesh_config(overrides: list[str]) -> MeshConfig | None:
    """The mesh from ``mesh.*=..`` overrides (sizes checked against the devices), or None when there are none.

    Raises ConfigError / ValueError naming a bad key or impossible sizes.
    """
    if not overrides:
        return None
    cfg = apply_overrides(SampleOverrides(), overrides).mesh
    import jax

    cfg.resolve(len(jax.devices()))
    return cfg


if __name__ == "__main__":
    sys.exit(main())
