"""``python -m contentv_jax.sample``: text -> video with a ContentV checkpoint, like the official ``demo.py``.

Examples::

    python -m contentv_jax.sample --model ContentV-8B --prompt "A young musician ..." --out video.mp4
    python -m contentv_jax.sample --model ContentV-8B --prompts-file scene.txt --out videos/ --videos-per-prompt 5
    python -m contentv_jax.sample --model ContentV-8B --prompt "..." mesh.fsdp=1 mesh.sequence=4 --chunked-attention

Defaults are the official pipeline's (github bytedance/ContentV ``contentv_pipeline.py`` / ``demo.py``):
125 frames, 432x768, 50 steps, guidance 6.0, the demo's negative prompt, 24 fps, flow shift from the model
directory's ``scheduler/scheduler_config.json`` (17 if it has none), transformer in bfloat16, VAE in float32.

Outputs (``--output-type``): ``mp4`` (one file per video), ``frames`` (float32 .npy (B, F, H, W, 3) in [0, 1]),
``latent`` (float32 .npy (B, T, H/8, W/8, C), the final normalised latents). With ``--prompts-file`` every line is
a prompt and ``--out`` a directory: VBench names, ``<prompt>-<index>.mp4`` (``.npy`` per prompt otherwise).
Every file is written to a temporary sibling and moved into place.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from contentv_jax import pipeline as pl
from contentv_jax.config import ConfigError, apply_overrides
from contentv_jax.sharding.mesh import MeshConfig

logger = logging.getLogger("contentv_jax.sample")

DTYPES = ("bfloat16", "float32", "float16")


def build_parser() -> argparse.ArgumentParser:
    """The ``argparse`` parser of ``python -m contentv_jax.sample`` (flags close to the official demo)."""
    p = argparse.ArgumentParser(
        prog="python -m contentv_jax.sample",
        description="Sample videos from a ContentV checkpoint (flow-shift Euler with classifier-free guidance).",
        epilog="Trailing mesh.data=N mesh.fsdp=N mesh.sequence=N set the device mesh (sequence > 1: Ulysses).",
    )
    p.add_argument("--model", required=True, help="ContentV directory: transformer/, vae/, scheduler/, "
                   "text_encoder{,_2,_3}/, tokenizer{,_2,_3}/ (diffusers layout or our converted checkpoints)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="the text prompt")
    src.add_argument("--prompts-file", type=Path, help="one prompt per line; one video per line and index")
    src.add_argument("--prompt-embeds", type=Path, help=".npz with prompt_embeds, pooled_prompt_embeds, "
                     "negative_prompt_embeds, negative_pooled_prompt_embeds (no text encoder is loaded)")
    p.add_argument("--negative-prompt", default=None, help="default: the official demo's negative prompt")
    p.add_argument("--num-frames", type=int, default=125, help="rounded down to 4k+1 with a warning")
    p.add_argument("--height", type=int, default=432, help="multiple of 16")
    p.add_argument("--width", type=int, default=768, help="multiple of 16")
    p.add_argument("--steps", type=int, default=50)
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
    p.add_argument("--max-prompts", type=int, default=None, help="only the first N lines of --prompts-file")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="transformer dtype (VAE: float32)")
    mem = p.add_argument_group("memory")
    mem.add_argument("--vae-tiling", action="store_true", help="decode in spatial tiles")
    mem.add_argument("--chunked-attention", action="store_true", help="online-softmax attention in chunks")
    mem.add_argument("--attention-kernel", default=None, help="xla | cudnn | splash | chunked (overrides the above)")
    mem.add_argument("--offload", action="store_true",
                     help="keep parameters in host memory; each model goes to the device only while it runs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", help="mesh.data=.. mesh.fsdp=.. mesh.sequence=..")
    return p


def _read_prompts(path: Path, limit: int | None) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"--prompts-file {path} does not exist")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if limit is not None:
        prompts = prompts[:limit]
    if not prompts:
        raise ValueError(f"--prompts-file {path} has no prompts")
    return prompts


def vbench_name(prompt: str, index: int, suffix: str = ".mp4") -> str:
    """VBench's file name ``<prompt>-<index>.mp4`` (path separators in the prompt become ``_``)."""
    return prompt.replace(os.sep, "_") + f"-{index}{suffix}"


def _save_npy(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp.npy", dir=path.parent)
    os.close(fd)
    try:
        np.save(tmp, array)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _write_outputs(result: np.ndarray, output_type: str, names: list[Path], npy_path: Path, fps: float) -> list[Path]:
    if output_type != "mp4":
        _save_npy(npy_path, result)
        return [npy_path]
    from contentv_jax.data.video import write_video

    return [write_video(path, video, fps) for path, video in zip(names, result)]


def main(argv: list[str] | None = None) -> int:
    """CLI entry point of ``python -m contentv_jax.sample``; returns the exit status (0 ok, 2 bad input, named on stderr before any compute)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # ---- every check before anything heavy is loaded or computed
    if args.prompt is None and args.prompts_file is None and args.prompt_embeds is None:
        print("error: give --prompt, --prompts-file or --prompt-embeds", file=sys.stderr)
        return 2
    try:
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
        kernel = args.attention_kernel or ("chunked" if args.chunked_attention else None)
        if kernel is not None:
            from contentv_jax.models.attention import KERNELS

            if kernel not in KERNELS:
                raise ValueError(f"--attention-kernel {kernel!r} is not one of {KERNELS}")
        need_text = args.prompt_embeds is None
        pl.ContentVPipeline.check_model_dir(args.model, need_text=need_text, need_vae=args.output_type != "latent")
        dims = pl.transformer_dims(Path(args.model) / "transformer")
        guidance = args.guidance_scale > 1.0
        embeds = None
        if args.prompt_embeds is not None:
            embeds = pl.PromptEmbeds.load(args.prompt_embeds)
            embeds.validate(dims["context_dim"], dims["pooled_dim"], guidance)
        prompts = (
            [args.prompt] if args.prompt is not None
            else _read_prompts(args.prompts_file, args.max_prompts) if args.prompts_file is not None
            else None
        )
        latents = None
        if args.latents is not None:
            if args.prompts_file is not None:
                raise ValueError("--latents cannot be combined with --prompts-file (one noise tensor per run)")
            latents = np.load(args.latents).astype(np.float32)
            batch = (1 if embeds is None else embeds.batch) * args.videos_per_prompt
            want = pl.latent_shape(batch, num_frames, args.height, args.width, dims["in_channels"])
            if latents.shape != want:
                raise ValueError(f"--latents {args.latents} must have shape {want}, got {latents.shape}")
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
        load_text_encoders=need_text,
        load_vae=args.output_type != "latent",
        shift=args.shift,
        dtype=args.dtype,
        mesh=mesh,
        attention_kernel=kernel,
        vae_tiling=args.vae_tiling,
        offload=args.offload,
    )
    logger.info("flow shift %.3g, %d frames, %dx%d, %d steps, guidance %.3g",
                pipe.shift, num_frames, args.height, args.width, args.steps, args.guidance_scale)
    opts = pl.SamplingOptions(
        num_frames=num_frames, height=args.height, width=args.width, num_steps=args.steps,
        guidance_scale=args.guidance_scale, shift=args.shift, max_sequence_length=args.max_sequence_length,
    )
    output_type = "latent" if args.output_type == "latent" else "frames"
    suffix = ".mp4" if args.output_type == "mp4" else ".npy"
    common = dict(options=opts, videos_per_prompt=args.videos_per_prompt, output_type=output_type,
                  progress=not args.no_progress)
    written: list[Path] = []
    if args.prompts_file is not None:
        out_dir = args.out or Path("videos")
        for i, prompt in enumerate(prompts):
            logger.info("[%d/%d] %s", i + 1, len(prompts), prompt)
            result = pipe(prompt, negative_prompt=args.negative_prompt, seed=args.seed + i, **common)
            names = [out_dir / vbench_name(prompt, k) for k in range(len(result))]
            npy_path = out_dir / (prompt.replace(os.sep, "_") + ".npy")
            written += _write_outputs(result, args.output_type, names, npy_path, args.fps)
    else:
        out = args.out or Path("video" + suffix)
        result = pipe(prompts, negative_prompt=args.negative_prompt, embeds=embeds, seed=args.seed,
                      latents=latents, **common)
        names = [out] if len(result) == 1 else [out.with_name(f"{out.stem}-{k}{out.suffix}") for k in range(len(result))]
        written += _write_outputs(result, args.output_type, names, out, args.fps)
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
