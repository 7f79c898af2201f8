"""The GPU suite: the figures a lent accelerator should produce, in one run, as one JSON line.

Parts (each timed apart; a part that fails records its error and the suite goes on):

- ``gemm``: the measured bf16 / f32 GEMM peak (``bench/roofline.py``: XLA and torch on square GEMMs).
- ``train``: one train step of ``contentv-8b``'s blocks (``--train-layers`` layers, bf16 compute, float32
  master weights and AdamW, full remat, cuDNN flash attention) at Stage-3 tokens (125 frames at 432x768:
  latents 32 x 54 x 96, 41,472 video + 333 text tokens); MFU = closed-form model FLOPs
  (``bench/scale_plan.closed_form_flops``, 3 x forward) / time, against 989 TFLOP/s (H100/H200 dense bf16) and
  against the measured GEMM peak.
- ``sampling``: one CFG denoising step of the full 8B in bf16 at 432x768x125 (``contentv_jax.pipeline.denoise``:
  both branches batched): seconds per step, 50-step extrapolation, peak device memory.
- ``attention``: ``cudnn`` vs ``xla`` vs ``chunked`` kernels (38 heads x 64, bf16): max abs difference from
  ``xla`` and seconds, at ``--attn-tokens`` (the ``xla`` kernel holds the full logits, so it runs at the
  smaller size only) and ``cudnn`` / ``chunked`` at Stage 3's 41,805 tokens.
- ``vae``: the Wan2.1 VAE decode of 125 frames at 432x768 (float32, random weights): seconds, peak memory.
- ``torch_sampling``: the same CFG step in PyTorch (ContentV's ``SD3Transformer3DModel``, diffusers' SD3 with the
  3D patch embed, SDPA attention), bf16, two sequential passes as the official pipeline; it needs diffusers,
  so where diffusers is missing the part records that as its reason.

``--dry-run`` runs every part end to end on tiny shapes on whatever backend is there (CPU included): tiny
transformer, tiny VAE, 256-token attention; kernels the backend lacks (``cudnn`` off GPU) are recorded as skipped
with the reason.

    python bench/gpu_suite.py [--dry-run] [--parts gemm train sampling attention vae torch_sampling]

Prints one line per part, then one JSON line as its last line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

H100_BF16_DENSE_TFLOPS = 989.0
PARTS = ("gemm", "train", "sampling", "attention", "vae", "torch_sampling")


def _peak_bytes() -> int | None:
    try:
        return int(jax.devices()[0].memory_stats()["peak_bytes_in_use"])
    except Exception:  # noqa: BLE001 - CPU devices have no memory stats
        return None


def _timed(fn, repeats: int) -> float:
    """Median seconds of ``repeats`` calls of ``fn`` (which blocks on its result)."""
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def shapes(dry: bool) -> dict:
    if dry:  # tiny: 2 latent frames of 8 x 8 -> 32 video tokens
        return dict(frames=5, height=64, width=64, latent=(2, 8, 8), text=16, attn_tokens=256, attn_big=512,
                    heads=4, head_dim=16, model="tiny", vae="tiny", repeats=1)
    return dict(frames=125, height=432, width=768, latent=(32, 54, 96), text=333, attn_tokens=8192, attn_big=41_805,
                heads=38, head_dim=64, model="contentv-8b", vae="wan2.1", repeats=3)


def _model_cfg(sh: dict, **overrides):
    from contentv_jax.models.transformer import get_config

    return get_config(sh["model"], **overrides)


def part_gemm(sh, args) -> dict:
    from bench.roofline import measure

    n = 512 if args.dry_run else 8192
    res = measure((n,), ("bfloat16", "float32"), repeats=sh["repeats"])
    return {"n": n, "gflops": res, "bf16_peak_tflops": max(res["bfloat16"][str(n)].values()) / 1e3,
            "f32_peak_tflops": max(res["float32"][str(n)].values()) / 1e3}


def part_train(sh, args, gemm) -> dict:
    import optax
    from flax import nnx

    from bench.scale_plan import closed_form_flops
    from contentv_jax.models.transformer import init_model

    on_gpu = jax.default_backend() == "gpu"
    kernel = "cudnn" if on_gpu else "chunked"
    layers = args.train_layers if not args.dry_run else 3
    cfg = _model_cfg(sh, num_layers=layers, dtype="bfloat16", param_dtype="float32", remat_policy="full",
                     attention_kernel=kernel)
    model = init_model(cfg)
    t, h, w = sh["latent"]
    rng = np.random.default_rng(0)
    lat = jnp.asarray(rng.standard_normal((1, t, h, w, cfg.in_channels)), jnp.float32)
    tgt = jnp.asarray(rng.standard_normal(lat.shape), jnp.float32)
    ctx = jnp.asarray(rng.standard_normal((1, sh["text"], cfg.joint_attention_dim)), jnp.bfloat16)
    pooled = jnp.asarray(rng.standard_normal((1, cfg.pooled_projection_dim)), jnp.bfloat16)
    ts = jnp.asarray([700.0], jnp.float32)
    opt = nnx.Optimizer(model, optax.adamw(1e-5), wrt=nnx.Param)

    @nnx.jit
    def step(m, o, a, b, c, d, y):
        loss, g = nnx.value_and_grad(lambda m: jnp.mean((m(a.astype(jnp.bfloat16), b, c, d).astype(jnp.float32) - y) ** 2))(m)
        o.update(m, g)
        return loss

    t0 = time.perf_counter()
    float(step(model, opt, lat, ts, ctx, pooled, tgt))
    compile_s = time.perf_counter() - t0
    sec = _timed(lambda: float(step(model, opt, lat, ts, ctx, pooled, tgt)), sh["repeats"])
    video_tokens = t * (h // cfg.patch_size) * (w // cfg.patch_size)
    flops = closed_form_flops(cfg, video_tokens, sh["text"], 1)
    achieved = flops["model_train"] / sec / 1e12
    out = {"layers": layers, "attention_kernel": kernel, "remat": "full", "video_tokens": video_tokens,
           "text_tokens": sh["text"], "step_s": sec, "compile_s": compile_s, "model_tflop": flops["model_train"] / 1e12,
           "achieved_tflops": achieved, "mfu_vs_989": achieved / H100_BF16_DENSE_TFLOPS, "peak_bytes": _peak_bytes()}
    if gemm and "bf16_peak_tflops" in gemm:
        out["mfu_vs_measured_gemm"] = achieved / gemm["bf16_peak_tflops"]
    return out


def _embeds(sh, cfg, batch=1):
    from contentv_jax import pipeline as pl

    rng = np.random.default_rng(0)
    return pl.PromptEmbeds(*(rng.normal(size=s).astype(np.float32)
                             for s in [(batch, sh["text"], cfg.joint_attention_dim), (batch, cfg.pooled_projection_dim)] * 2))


def part_sampling(sh, args) -> dict:
    from contentv_jax import pipeline as pl
    from contentv_jax.models.transformer import init_model
    from contentv_jax.scheduler import sampling_sigmas

    kernel = "cudnn" if jax.default_backend() == "gpu" else "xla"
    cfg = _model_cfg(sh, dtype="bfloat16", param_dtype="bfloat16", remat_policy="none", attention_kernel=kernel)
    model = init_model(cfg)
    embeds = _embeds(sh, cfg)
    t, h, w = sh["latent"]
    noise = np.random.default_rng(1).standard_normal((1, t, h, w, cfg.in_channels)).astype(np.float32)
    steps = 2
    sig = sampling_sigmas(steps, 3.0)
    t0 = time.perf_counter()
    np.asarray(pl.denoise(model, noise, embeds, sig, 6.0))
    first = time.perf_counter() - t0
    sec = _timed(lambda: np.asarray(pl.denoise(model, noise, embeds, sig, 6.0)), max(1, sh["repeats"] - 1)) / steps
    return {"attention_kernel": kernel, "per_step_s": sec, "extrapolated_50_steps_s": 50 * sec,
            "first_call_minus_steps_s": first - steps * sec, "peak_bytes": _peak_bytes(),
            "params": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(__import__("flax").nnx.state(model)))}


def part_attention(sh, args) -> dict:
    from contentv_jax.models.attention import dot_product_attention

    on_gpu = jax.default_backend() == "gpu"
    out = {"heads": sh["heads"], "head_dim": sh["head_dim"], "dtype": "bfloat16"}
    for tokens, kernels in ((sh["attn_tokens"], ("xla", "cudnn", "chunked")), (sh["attn_big"], ("cudnn", "chunked"))):
        rng = np.random.default_rng(0)
        q, k, v = (jnp.asarray(rng.standard_normal((1, tokens, sh["heads"], sh["head_dim"])), jnp.bfloat16) for _ in range(3))
        res, ref = {}, None
        for kern in kernels:
            if kern == "cudnn" and not on_gpu:
                res[kern] = {"skipped": "cudnn needs a GPU backend"}
                continue
            fn = jax.jit(lambda q, k, v, kern=kern: dot_product_attention(q, k, v, kernel=kern))
            o = fn(q, k, v).block_until_ready()
            sec = _timed(lambda: fn(q, k, v).block_until_ready(), sh["repeats"])
            res[kern] = {"seconds": sec, "tflops": 4 * tokens**2 * sh["head_dim"] * sh["heads"] / sec / 1e12}
            if ref is None:
                ref = o.astype(jnp.float32)
                res[kern]["reference"] = True
            else:
                res[kern]["max_abs_diff_vs_" + kernels[0]] = float(jnp.abs(o.astype(jnp.float32) - ref).max())
            del o
        out[str(tokens)] = res
    return out


def part_vae(sh, args) -> dict:

    from contentv_jax.models.vae import get_config, init_vae

    vae = init_vae(get_config(sh["vae"]))
    t, h, w = sh["latent"]
    z = jnp.asarray(np.random.default_rng(0).standard_normal((1, t, h, w, 16)), jnp.float32)
    t0 = time.perf_counter()
    frames = vae.decode(z)
    jax.block_until_ready(frames)
    first = time.perf_counter() - t0
    sec = _timed(lambda: jax.block_until_ready(vae.decode(z)), max(1, sh["repeats"] - 1))
    return {"frames": int(frames.shape[1]), "height": int(frames.shape[2]), "width": int(frames.shape[3]),
            "seconds": sec, "first_call_s": first, "peak_bytes": _peak_bytes()}


def part_torch_sampling(sh, args) -> dict:
    try:
        import diffusers  # noqa: F401
        import torch
    except ImportError as e:
        return {"skipped": f"the PyTorch reference needs diffusers (SD3Transformer2DModel), not installed here: {e}"}
    from contentv_jax.models.transformer import CONFIGS
    from torch_npu_backend.transformer import SD3Transformer3DModel

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    c = CONFIGS["tiny" if args.dry_run else "contentv-8b"]
    tcfg = dict(num_layers=c.num_layers, num_attention_heads=c.num_attention_heads, attention_head_dim=c.attention_head_dim,
                in_channels=c.in_channels, out_channels=c.out_channels, joint_attention_dim=c.joint_attention_dim,
                caption_projection_dim=c.caption_projection_dim, pooled_projection_dim=c.pooled_projection_dim,
                patch_size=c.patch_size, qk_norm=c.qk_norm, pos_embed_max_size=None, sample_size=c.sample_size)
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    with torch.device(dev):
        model = SD3Transformer3DModel(**tcfg).to(dtype).eval()
    t, h, w = sh["latent"]
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn((1, c.in_channels, t, h, w), generator=g).to(dev, dtype)
    ctx = torch.randn((1, sh["text"], c.joint_attention_dim), generator=g).to(dev, dtype)
    pooled = torch.randn((1, c.pooled_projection_dim), generator=g).to(dev, dtype)
    ts = torch.tensor([700.0], device=dev)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    def step():
        with torch.no_grad():
            v_c = model(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=ts).sample
            v_u = model(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=ts).sample
            (v_u + 6.0 * (v_c - v_u))
        sync()

    step()
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sec = _timed(step, max(1, sh["repeats"] - 1))
    return {"device": dev, "dtype": str(dtype), "per_step_s": sec, "extrapolated_50_steps_s": 50 * sec,
            "peak_bytes": torch.cuda.max_memory_allocated() if dev == "cuda" else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="tiny shapes, any backend (CPU included)")
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    p.add_argument("--train-layers", type=int, default=3, help="contentv-8b layers in the train-step part")
    args = p.parse_args(argv)
    sh = shapes(args.dry_run)
    out = {"bench": "gpu_suite", "dry_run": args.dry_run, "backend": jax.default_backend(),
           "device": str(jax.devices()[0].device_kind), "jax": jax.__version__, "shapes": sh,
           "loadavg_before": os.getloadavg()}
    t_all = time.perf_counter()
    for part in args.parts:
        t0 = time.perf_counter()
        try:
            if part == "train":
                res = part_train(sh, args, out.get("gemm"))
            else:
                res = globals()[f"part_{part}"](sh, args)
        except Exception as e:  # noqa: BLE001 - one part failing must not lose the others' figures
            res = {"error": f"{type(e).__name__}: {e}"[:500], "traceback": traceback.format_exc()[-1500:]}
        res["wall_s"] = time.perf_counter() - t0
        out[part] = res
        short = {k: v for k, v in res.items() if k != "traceback" and not isinstance(v, dict)}
        print(f"{part}: {json.dumps(short, default=str)[:600]}", flush=True)
        jax.clear_caches()
    out["wall_s"] = time.perf_counter() - t_all
    out["loadavg_after"] = os.getloadavg()
    out["errors"] = [k for k in args.parts if "error" in out[k]]
    print(json.dumps(out, default=str))
    return 1 if out["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
