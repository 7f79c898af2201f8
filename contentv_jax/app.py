"""``python -m contentv_jax.app``: a Gradio web UI for text-to-video with a ContentV model.

Examples::

    python -m contentv_jax.app                         # the tiny demo model (built on first start)
    python -m contentv_jax.app --model ContentV-8B --port 7860
    python -m contentv_jax.app --model runs/tiny mesh.fsdp=4

What the community web-UI fork of ContentV (``app.py``) offers, on our Python pipeline
(:class:`contentv_jax.pipeline.ContentVPipeline`, the same code path as ``python -m contentv_jax.sample``):
prompt, negative prompt (the official default prefilled), frames, fps, size (the report's aspect buckets or
free multiples of 16), steps, guidance scale, flow shift, seed (random unless given), videos per prompt,
and the memory switches (model offload, sequential offload, VAE tiling, VAE slicing, chunked attention).
Every video goes to ``--outputs`` (default ``outputs/``) with a JSON sidecar of the settings, seed and
timings. The pipeline stays loaded between jobs and is rebuilt only when the model directory or a switch
that changes its parameters' placement or program (dtype, offload, attention kernel) changes; one job runs
at a time (Gradio's queue); a queued or running job can be cancelled (a running one stops at the next
stage: text encoding, denoising, decoding). Compilations are counted through ``jax.monitoring`` and their
time is shown apart from the run time.

The server binds 127.0.0.1 unless ``--host`` says otherwise (0.0.0.0 prints a warning); there are no share
links. When it is ready it prints one line ``contentv-app ready: URL`` on stdout. Exit status: 0 after a
normal stop, 2 for bad arguments (named on stderr).

Requires the ``ui`` extra: ``pip install -e ".[ui]"``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import secrets
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from contentv_jax import pipeline as pl

logger = logging.getLogger("contentv_jax.app")

MAX_VIDEOS = 4  # video players on the page (videos per prompt is capped to it)
DTYPES = ("bfloat16", "float32", "float16")
READY_PREFIX = "contentv-app ready: "
CUSTOM = "custom"

SWITCH_HELP = {
    "offload": (
        "Where the transformer's and VAE's parameters live. none: on the device (fastest). model: in host "
        "memory, each model moved to the device only while it runs (less device memory, a copy per job). "
        "sequential: as model, and the transformer's blocks stream one at a time during denoising (least "
        "device memory, slowest: one transfer per block and step; one device only)."
    ),
    "vae_tiling": "VAE tiling: decode in overlapping 256-pixel tiles; bounds decoder memory for large frames, "
    "slightly slower, seams blended.",
    "vae_slicing": "VAE slicing: decode the videos of a batch one at a time; decoder memory of one video, "
    "more sequential work.",
    "chunked": "Chunked attention: online-softmax attention over key chunks; attention memory no longer grows "
    "with the square of the tokens, somewhat slower (changes the compiled program).",
}


# ------------------------------------------------------------------------------------------- compile counter
class CompileCounter:
    """Counts XLA compilations and their seconds via ``jax.monitoring`` (backend-compile events)."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        self.count = 0
        self.seconds = 0.0
        self._lock = threading.Lock()
        import jax.monitoring

        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **_: Any) -> None:
        if event == self.EVENT:
            with self._lock:
                self.count += 1
                self.seconds += float(duration)

    def snapshot(self) -> tuple[int, float]:
        with self._lock:
            return self.count, self.seconds


# ---------------------------------------------------------------------------------------------- settings
@dataclasses.dataclass
class Settings:
    """One job's inputs, as the page sends them (checked by :meth:`check`)."""

    model: str
    prompt: str
    negative_prompt: str = pl.DEFAULT_NEGATIVE_PROMPT
    num_frames: int = 125
    fps: float = 24.0
    height: int = 432
    width: int = 768
    steps: int = 50
    guidance_scale: float = 6.0
    flow_shift: float | None = None  # None: the model's scheduler config
    seed: int | None = None  # None: random
    videos_per_prompt: int = 1
    dtype: str = "bfloat16"
    offload: str = "none"
    vae_tiling: bool = False
    vae_slicing: bool = False
    chunked_attention: bool = False

    def check(self) -> list[str]:
        """Raises ValueError (one line naming the input) for a bad value; returns notices (e.g. rounding)."""
        notes = []
        if not self.model.strip():
            raise ValueError("model directory: give a path")
        if not self.prompt.strip():
            raise ValueError("prompt: write what the video should show")
        for name in ("num_frames", "height", "width", "steps", "videos_per_prompt"):
            value = getattr(self, name)
            if value is None or not float(value).is_integer():
                raise ValueError(f"{name.replace('_', ' ')}: expected a whole number, got {value!r}")
            setattr(self, name, int(value))
        if self.num_frames < 1:
            raise ValueError(f"frames: expected at least 1, got {self.num_frames}")
        pl.check_video_size(self.height, self.width)
        if self.num_frames % pl.VAE_TEMPORAL_FACTOR != 1:
            rounded = self.num_frames // pl.VAE_TEMPORAL_FACTOR * pl.VAE_TEMPORAL_FACTOR + 1
            notes.append(f"frames: {self.num_frames} is not 4k+1, rounded down to {rounded} (as the official pipeline)")
            self.num_frames = rounded
        if self.steps < 1:
            raise ValueError(f"steps: expected at least 1, got {self.steps}")
        if not 1 <= self.videos_per_prompt <= MAX_VIDEOS:
            raise ValueError(f"videos per prompt: expected 1..{MAX_VIDEOS}, got {self.videos_per_prompt}")
        if self.fps is None or not (self.fps > 0 and math.isfinite(self.fps)):
            raise ValueError(f"fps: expected a positive number, got {self.fps!r}")
        if self.guidance_scale is None or not math.isfinite(self.guidance_scale):
            raise ValueError(f"guidance scale: expected a number, got {self.guidance_scale!r}")
        if self.flow_shift is not None and not (self.flow_shift > 0 and math.isfinite(self.flow_shift)):
            raise ValueError(f"flow shift: expected a positive number or empty (the model's), got {self.flow_shift!r}")
        if self.seed is not None:
            if not float(self.seed).is_integer() or not 0 <= self.seed < 2**63:
                raise ValueError(f"seed: expected a whole number >= 0 or empty (random), got {self.seed!r}")
            self.seed = int(self.seed)
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: expected one of {DTYPES}, got {self.dtype!r}")
        if self.offload not in pl.OFFLOAD_MODES:
            raise ValueError(f"offload: expected one of {pl.OFFLOAD_MODES}, got {self.offload!r}")
        return notes

    def pipeline_key(self, mesh_key) -> tuple:
        """What the loaded pipeline depends on: a change rebuilds it (the other settings apply per job)."""
        kernel = "chunked" if self.chunked_attention else None
        return (str(Path(self.model).expanduser().resolve()), self.dtype, self.offload, kernel, mesh_key)


def resolution_presets() -> dict[str, tuple[int, int]]:
    """Label -> (height, width): the report's seven aspect buckets at the 480p area of 432x768 (ContentV
    report (arXiv 2506.05343), section 5.3, via ``contentv_jax.data.buckets.make_buckets``) and the tiny
    demo's 64x64."""
    from contentv_jax.data.buckets import make_buckets

    out = {}
    for b in make_buckets(1, 432, 768, fps=1.0, images=True, videos=False):
        out[f"{b.height}x{b.width} ({b.aspect})"] = (b.height, b.width)
    out["64x64 (tiny demo)"] = (64, 64)
    return out


# ------------------------------------------------------------------------------------------------ the app
class App:
    """The state behind the page: the loaded pipeline, the compile counter, the outputs directory."""

    def __init__(self, default_model: str, outputs: Path, mesh=None, mesh_key=None):
        self.default_model = default_model
        self.outputs = Path(outputs)
        self.mesh, self.mesh_key = mesh, mesh_key
        self.compiles = CompileCounter()
        self.pipe: pl.ContentVPipeline | None = None
        self.pipe_key: tuple | None = None
        self.builds = 0  # pipelines built so far (a rebuild is visible in the page)
        self.jobs = 0  # jobs started so far (numbered in the page)
        self.device_lock = threading.Lock()  # one job on the device at a time (the queue's limit, and more)

    # -- pipeline cache
    def pipeline(self, s: Settings) -> tuple[pl.ContentVPipeline, bool]:
        key = s.pipeline_key(self.mesh_key)
        if self.pipe is not None and self.pipe_key == key:
            return self.pipe, False
        self.pipe = self.pipe_key = None  # drop the old one before loading the next
        pipe = pl.ContentVPipeline.from_pretrained(
            Path(s.model).expanduser(),
            dtype=s.dtype,
            mesh=self.mesh,
            attention_kernel="chunked" if s.chunked_attention else "auto",  # as the sampling CLI
            offload=s.offload,
        )
        self.pipe, self.pipe_key = pipe, key
        self.builds += 1
        return pipe, True

    # -- one job, stage by stage (a generator: Gradio can cancel between stages)
    def run(self, s: Settings):
        """Yields ``("status", text)`` while working, then ``("done", result dict)``. Raises ValueError /
        FileNotFoundError for bad input (before any compute)."""
        self.jobs += 1
        job = self.jobs
        notes = s.check()
        seed = s.seed if s.seed is not None else secrets.randbelow(2**31)
        timings: dict[str, float] = {}
        compile_s: dict[str, float] = {}
        c0 = self.compiles.snapshot()

        def stage(name, fn):
            t0c = self.compiles.snapshot()[1]
            t0 = time.perf_counter()
            out = fn()
            timings[name] = time.perf_counter() - t0
            compile_s[name] = self.compiles.snapshot()[1] - t0c
            return out

        with self.device_lock:
            yield "status", "loading the model..." if self.pipe_key != s.pipeline_key(self.mesh_key) else "text encoding..."
            pipe, rebuilt = stage("load", lambda: self.pipeline(s))
            pipe.vae_tiling, pipe.vae_slicing = s.vae_tiling, s.vae_slicing
            guidance = s.guidance_scale > 1.0
            yield "status", "text encoding..."
            embeds = stage(
                "text_encoding",
                lambda: pipe.encode_prompt([s.prompt], s.negative_prompt, do_classifier_free_guidance=guidance),
            )
            yield "status", f"denoising ({s.steps} steps)..."
            latents = stage("denoising", lambda: _denoise(pipe, embeds, s, seed))
            yield "status", "decoding..."
            frames = stage("decoding", lambda: pipe.decode(latents))
        c1 = self.compiles.snapshot()
        result = dict(
            job=job,
            seed=seed,
            notes=notes,
            timings=timings,
            compile_seconds=compile_s,
            compilations=c1[0] - c0[0],
            compilations_total=c1[0],
            pipeline_rebuilt=rebuilt,
            pipeline_builds=self.builds,
            peak_device_memory=peak_device_memory(),
        )
        result["files"] = self.write_outputs(frames, s, result)
        yield "done", result

    def write_outputs(self, frames: np.ndarray, s: Settings, result: dict) -> list[dict]:
        """Each video as ``outputs/<time>-<seed>-<k>.mp4`` with a ``.json`` sidecar (temp file + rename)."""
        from contentv_jax.data.video import write_video

        stamp = time.strftime("%Y%m%d-%H%M%S") + f"-{time.time_ns() % 1_000_000_000:09d}"
        written = []
        for k, video in enumerate(frames):
            path = self.outputs / f"{stamp}-seed{result['seed']}-{k}.mp4"
            write_video(path, video, s.fps)
            sidecar = dict(
                settings=dataclasses.asdict(s) | {"seed": result["seed"]},
                seed=result["seed"],
                video_index=k,
                frames=list(video.shape),
                flow_shift=s.flow_shift if s.flow_shift is not None else self.pipe.shift,
                timings_s=result["timings"],
                compile_s=result["compile_seconds"],
                compilations=result["compilations"],
                peak_device_memory=result["peak_device_memory"],
                video=path.name,
            )
            side = path.with_suffix(".json")
            _write_text_atomic(side, json.dumps(sidecar, indent=2) + "\n")
            written.append({"video": str(path), "sidecar": str(side)})
        return written

    def gallery(self, limit: int = 24) -> list[str]:
        """The newest videos under the outputs directory (newest first)."""
        if not self.outputs.is_dir():
            return []
        videos = sorted(self.outputs.glob("*.mp4"), key=lambda p: p.stat().st_mtime, reverse=True)
        return [str(p) for p in videos[:limit]]


def _denoise(pipe: pl.ContentVPipeline, embeds: pl.PromptEmbeds, s: Settings, seed: int):
    """Final latents through the pipeline's own call (``output_type="latent"``), tqdm bar on (the page's
    progress bar follows it)."""
    return pipe(
        prompt_embeds=embeds.prompt_embeds, pooled_prompt_embeds=embeds.pooled_prompt_embeds,
        negative_prompt_embeds=embeds.negative_prompt_embeds,
        negative_pooled_prompt_embeds=embeds.negative_pooled_prompt_embeds,
        num_frames=s.num_frames, height=s.height, width=s.width, num_inference_steps=s.steps,
        guidance_scale=s.guidance_scale, shift=s.flow_shift, num_videos_per_prompt=s.videos_per_prompt,
        seed=seed, output_type="latent",
    ).frames


def peak_device_memory() -> dict | None:
    """``peak_bytes_in_use`` / ``bytes_in_use`` of device 0 since the process started, where the backend
    reports them (GPU, TPU); None where it does not (CPU)."""
    import jax

    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:
        return None
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return {"peak_bytes_in_use": int(stats["peak_bytes_in_use"]), "bytes_in_use": int(stats.get("bytes_in_use", 0))}


def _write_text_atomic(path: Path, text: str) -> None:
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _format_timings(result: dict) -> str:
    rows = ["| stage | time (s) | of which compiling (s) |", "|---|---|---|"]
    for name, t in result["timings"].items():
        rows.append(f"| {name.replace('_', ' ')} | {t:.2f} | {result['compile_seconds'].get(name, 0.0):.2f} |")
    mem = result["peak_device_memory"]
    mem_line = (
        f"peak device memory: {mem['peak_bytes_in_use'] / 2**20:.1f} MiB (since server start)"
        if mem else "peak device memory: not reported by this backend"
    )
    return "\n".join(rows) + "\n\n" + mem_line


def _format_compiles(result: dict) -> str:
    return (
        f"compilations this job: {result['compilations']} (total {result['compilations_total']}); "
        f"pipeline {'rebuilt' if result['pipeline_rebuilt'] else 'reused'} (builds: {result['pipeline_builds']})"
    )


# ------------------------------------------------------------------------------------------------- the page
def build_ui(app: App):
    """The Gradio Blocks page of ``app`` (queue: one job at a time)."""
    import gradio as gr

    presets = resolution_presets()
    with gr.Blocks(title="ContentV (JAX)") as demo:
        gr.Markdown(
            "# ContentV text-to-video (JAX)\nThe pipeline stays loaded between jobs; videos are written to "
            f"`{app.outputs}` with a JSON sidecar."
        )
        with gr.Row():
            with gr.Column(scale=3):
                model = gr.Textbox(label="model directory", value=app.default_model, elem_id="model")
                prompt = gr.Textbox(label="prompt", lines=3, elem_id="prompt",
                                    placeholder="what the video should show")
                negative = gr.Textbox(label="negative prompt", lines=2, value=pl.DEFAULT_NEGATIVE_PROMPT,
                                      elem_id="negative")
                with gr.Row():
                    frames = gr.Number(label="frames (4k+1)", value=125, precision=0, elem_id="frames")
                    fps = gr.Number(label="fps", value=24, elem_id="fps")
                    steps = gr.Number(label="steps", value=50, precision=0, elem_id="steps")
                with gr.Row():
                    preset = gr.Dropdown(label="size preset", choices=[CUSTOM, *presets], value="432x768 (16:9)"
                                         if "432x768 (16:9)" in presets else CUSTOM, elem_id="preset")
                    height = gr.Number(label="height (multiple of 16)", value=432, precision=0, elem_id="height")
                    width = gr.Number(label="width (multiple of 16)", value=768, precision=0, elem_id="width")
                with gr.Row():
                    guidance = gr.Number(label="guidance scale", value=6.0, elem_id="guidance")
                    shift = gr.Textbox(label="flow shift (empty: the model's)", value="", elem_id="shift")
                    seed = gr.Textbox(label="seed (empty: random)", value="", elem_id="seed")
                    count = gr.Number(label=f"videos per prompt (1-{MAX_VIDEOS})", value=1, precision=0,
                                      elem_id="count")
                with gr.Accordion("memory and precision", open=False):
                    dtype = gr.Dropdown(label="transformer dtype", choices=list(DTYPES), value="bfloat16",
                                        elem_id="dtype")
                    offload = gr.Radio(label="offload", choices=list(pl.OFFLOAD_MODES), value="none",
                                       info=SWITCH_HELP["offload"], elem_id="offload")
                    tiling = gr.Checkbox(label="VAE tiling", info=SWITCH_HELP["vae_tiling"], elem_id="tiling")
                    slicing = gr.Checkbox(label="VAE slicing", info=SWITCH_HELP["vae_slicing"], elem_id="slicing")
                    chunked = gr.Checkbox(label="chunked attention", info=SWITCH_HELP["chunked"], elem_id="chunked")
                with gr.Row():
                    run_btn = gr.Button("Generate", variant="primary", elem_id="generate")
                    cancel_btn = gr.Button("Cancel", elem_id="cancel")
            with gr.Column(scale=2):
                status = gr.Markdown("idle", elem_id="status")
                videos = [gr.Video(label=f"video {k + 1}", visible=k == 0, elem_id=f"video-{k}")
                          for k in range(MAX_VIDEOS)]
                files = gr.File(label="downloads (mp4 + JSON sidecar)", file_count="multiple", elem_id="files")
                timings = gr.Markdown(elem_id="timings")
                compiles = gr.Markdown(elem_id="compiles")
        gallery = gr.Gallery(label="earlier outputs", value=app.gallery, columns=6, elem_id="gallery")

        def on_preset(choice):
            if choice in presets:
                h, w = presets[choice]
                return h, w
            return gr.update(), gr.update()

        preset.change(on_preset, preset, [height, width], queue=False)

        inputs = [model, prompt, negative, frames, fps, height, width, steps, guidance, shift, seed, count,
                  dtype, offload, tiling, slicing, chunked]
        outputs = [status, files, timings, compiles, gallery, *videos]

        def generate(*values, progress=gr.Progress(track_tqdm=True)):
            keep = [gr.update()] * (len(outputs) - 1)
            (m, p, n, f, r, h, w, st, g, sh, sd, c, dt, off, til, sli, chu) = values
            try:
                sh, sd = _optional_number("flow shift", sh), _optional_number("seed", sd)
                s = Settings(model=m or "", prompt=p or "", negative_prompt=n or "", num_frames=f, fps=r,
                             height=h, width=w, steps=st, guidance_scale=g, flow_shift=sh, seed=sd,
                             videos_per_prompt=c, dtype=dt, offload=off, vae_tiling=bool(til),
                             vae_slicing=bool(sli), chunked_attention=bool(chu))
                for kind, payload in app.run(s):
                    if kind == "status":
                        yield (f"**working:** {payload}", *keep)
                    else:
                        result = payload
            except Exception as e:  # every failure becomes a message in the page; the server keeps serving
                logger.warning("job %d failed: %s: %s", app.jobs, type(e).__name__, e)
                yield (f"**Error** (job {app.jobs}): {_one_line(e)}", *keep)
                return
            paths = [f["video"] for f in result["files"]]
            notes = "".join(f"\n\n_note: {n}_" for n in result["notes"])
            done = f"**done:** job {result['job']}, seed {result['seed']}, {len(paths)} video(s) written to `{app.outputs}`{notes}"
            video_updates = [gr.update(value=paths[k] if k < len(paths) else None, visible=k < len(paths) or k == 0)
                             for k in range(MAX_VIDEOS)]
            sidecars = [f["sidecar"] for f in result["files"]]
            yield (done, paths + sidecars, _format_timings(result), _format_compiles(result), app.gallery(),
                   *video_updates)

        event = run_btn.click(generate, inputs, outputs, concurrency_limit=1, concurrency_id="device")
        cancel_btn.click(lambda: "**cancelled**", None, status, cancels=[event], queue=False)
    demo.queue(default_concurrency_limit=1)
    return demo


def _optional_number(name: str, text) -> float | None:
    """A text field's number, or None when empty. Raises ValueError naming the field otherwise."""
    text = "" if text is None else str(text).strip()
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{name}: expected a number or empty, got {text!r}") from None


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text if isinstance(e, (ValueError, FileNotFoundError)) else f"{type(e).__name__}: {text}"


# ---------------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    """The ``argparse`` parser of ``python -m contentv_jax.app``."""
    p = argparse.ArgumentParser(
        prog="python -m contentv_jax.app",
        description="Web UI for ContentV text-to-video (Gradio).",
        epilog="Trailing mesh.data=N mesh.fsdp=N mesh.sequence=N set the device mesh (as contentv_jax.sample).",
    )
    p.add_argument("--model", default=None, help="ContentV model directory (default: the tiny demo model, "
                   "built on first start under $CONTENTV_CACHE or ~/.cache/contentv-jax)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes the app to the network)")
    p.add_argument("--port", type=int, default=7860, help="port; 0 picks a free one")
    p.add_argument("--outputs", type=Path, default=Path("outputs"), help="directory for videos and sidecars")
    p.add_argument("overrides", nargs="*", help="mesh.data=.. mesh.fsdp=.. mesh.sequence=..")
    return p


def _free_port(host: str) -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 after a normal stop, 2 for bad arguments)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from contentv_jax.config import ConfigError
    from contentv_jax.sample import _mesh_config

    try:
        if not 0 <= args.port < 65536:
            raise ValueError(f"--port must be in 0..65535, got {args.port}")
        if args.model is not None and not Path(args.model).is_dir():
            raise FileNotFoundError(f"--model {args.model} is not a directory")
        mesh_cfg = _mesh_config(args.overrides)
    except (ValueError, FileNotFoundError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        import gradio  # noqa: F401
    except ImportError:
        print('error: the web UI needs Gradio: pip install -e ".[ui]"', file=sys.stderr)
        return 2
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("binding %s: the app is reachable from other machines; it has no authentication", args.host)
    mesh = mesh_key = None
    if mesh_cfg is not None:
        from contentv_jax.sharding.mesh import create_mesh

        mesh = create_mesh(mesh_cfg)
        mesh_key = tuple(sorted(dict(mesh.shape).items()))
    if args.model is None:
        from contentv_jax import demo_model

        logger.info("no --model: using the tiny demo model (%s)", demo_model.default_cache_dir())
        model = str(demo_model.ensure_demo_model())
    else:
        model = args.model
    demo = build_ui(App(model, args.outputs, mesh, mesh_key))
    allowed = [str(args.outputs.absolute())]
    for attempt in range(5):
        port = args.port or _free_port(args.host)
        try:
            demo.launch(server_name=args.host, server_port=port, share=False, prevent_thread_lock=True,
                        allowed_paths=allowed, show_error=False, quiet=True)
            break
        except OSError as e:
            if args.port or attempt == 4:
                print(f"error: cannot serve on {args.host}:{port}: {e}", file=sys.stderr)
                return 2
    print(f"{READY_PREFIX}{demo.local_url}", flush=True)
    try:
        demo.block_thread()
    except KeyboardInterrupt:
        pass
    finally:
        demo.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
