"""Benchmark: the JAX MM-DiT against the PyTorch ContentV reference on the same weights (issue 8).

Forward pass and one training step (flow-matching MSE, AdamW) at a small size: 4 layers, 8 heads x 64,
latents 5 x 16 x 16 x 16 (320 video tokens), 333 context tokens, batch 1. Both run on the local CPU
(or whatever JAX / torch default to). Reports medians of timed repeats after warm-up, torch and JAX
repeats interleaved, each after one untimed call of its own (``bench/timing.py``); the JAX
compile time is reported apart. Prints a table, then one JSON line as the last line.

``--dtype bfloat16`` runs both in bfloat16 compute with float32 master weights, as the trainer does: JAX with
the model's ``dtype="bfloat16"`` (parameters stay float32 and are cast at each matmul; AdamW on float32), torch
under ``torch.autocast("cpu", torch.bfloat16)`` (float32 parameters and AdamW). The achieved rates are also given
over the machine's measured GEMM peak for the dtype (``bench/roofline.py``).

Usage: ``python bench/transformer.py [--repeats 5] [--layers 4] [--threads N] [--dtype float32|bfloat16]
[--attention-kernel auto|xla|chunked]``. Ours runs the attention kernel the trainer resolves (``auto``: chunked on CPU)
unless told otherwise; torch runs SDPA.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from contentv_jax.models.attention import KERNEL_CHOICES  # noqa: E402


def _side_by_side(fns: dict, repeats: int) -> dict:
    """Median seconds of each callable, interleaved, each timed call after one untimed call of its own
    (``bench/timing.py``: the other library's spinning workers are idle by then)."""
    from bench.timing import medians

    return medians(fns, repeats)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype (weights float32)")
    p.add_argument("--no-roofline", action="store_true", help="skip the GEMM peak measurement")
    p.add_argument("--attention-kernel", default="auto", choices=KERNEL_CHOICES,
                   help="ours; default auto, as the trainer (chunked on CPU)")
    args = p.parse_args(argv)
    import contextlib
    import os

    load0 = os.getloadavg()
    bf16 = args.dtype == "bfloat16"
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    if args.threads:
        torch.set_num_threads(args.threads)

    from contentv_jax.checkpoints import load_transformer
    from converters.convert import from_diffusers
    from torch_npu_backend.transformer import SD3Transformer3DModel

    torch.manual_seed(0)
    tcfg = dict(num_layers=args.layers, num_attention_heads=8, attention_head_dim=64, caption_projection_dim=512,
                in_channels=16, out_channels=16, joint_attention_dim=4096, pooled_projection_dim=2048)
    tmodel = SD3Transformer3DModel(**tcfg)
    rng = np.random.default_rng(0)
    x = {
        "latents": rng.standard_normal((1, 5, 16, 16, 16), dtype=np.float32),
        "timestep": np.array([700.0], np.float32),
        "context": rng.standard_normal((1, 333, 4096), dtype=np.float32),
        "pooled": rng.standard_normal((1, 2048), dtype=np.float32),
        "target": rng.standard_normal((1, 5, 16, 16, 16), dtype=np.float32),
    }
    with tempfile.TemporaryDirectory() as d:
        tmodel.save_pretrained(Path(d) / "diffusers")
        from_diffusers("transformer", Path(d) / "diffusers", Path(d) / "ours")
        jmodel = load_transformer(Path(d) / "ours", dtype=args.dtype, param_dtype="float32",
                                  attention_kernel=args.attention_kernel)

    # ---- torch
    tx = {
        "hidden_states": torch.from_numpy(x["latents"]).permute(0, 4, 1, 2, 3).contiguous(),
        "encoder_hidden_states": torch.from_numpy(x["context"]),
        "pooled_projections": torch.from_numpy(x["pooled"]),
        "timestep": torch.from_numpy(x["timestep"]),
    }
    ttarget = torch.from_numpy(x["target"]).permute(0, 4, 1, 2, 3).contiguous()
    topt = torch.optim.AdamW(tmodel.parameters(), lr=1e-5)

    def torch_fwd():
        with torch.no_grad(), autocast():
            return tmodel(**tx).sample

    def torch_step():
        topt.zero_grad(set_to_none=True)
        with autocast():
            loss = torch.mean((tmodel(**tx).sample.float() - ttarget) ** 2)
        loss.backward()
        topt.step()
        return loss

    # ---- jax
    jx = {k: jnp.asarray(v) for k, v in x.items()}
    if bf16:  # the conditioning goes in at the compute dtype, as the trainer feeds it
        jx["context"], jx["pooled"] = jx["context"].astype(jnp.bfloat16), jx["pooled"].astype(jnp.bfloat16)
    fwd = nnx.jit(lambda m, a, b, c, d: m(a, b, c, d))
    jopt = nnx.Optimizer(jmodel, optax.adamw(1e-5), wrt=nnx.Param)

    @nnx.jit
    def train_step(m, opt, a, b, c, d, target):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(a, b, c, d).astype(jnp.float32) - target) ** 2))(m)
        opt.update(m, grads)
        return loss

    jargs = (jx["latents"], jx["timestep"], jx["context"], jx["pooled"])
    t = time.perf_counter()
    fwd(jmodel, *jargs).block_until_ready()
    compile_fwd = time.perf_counter() - t
    t = time.perf_counter()
    train_step(jmodel, jopt, *jargs, jx["target"]).block_until_ready()
    compile_step = time.perf_counter() - t

    for _ in range(args.warmup):
        torch_fwd()
        torch_step()
        fwd(jmodel, *jargs).block_until_ready()
        train_step(jmodel, jopt, *jargs, jx["target"]).block_until_ready()

    res = _side_by_side({
        "torch_forward_s": torch_fwd,
        "jax_forward_s": lambda: fwd(jmodel, *jargs).block_until_ready(),
    }, args.repeats)
    res.update(_side_by_side({
        "torch_train_step_s": torch_step,
        "jax_train_step_s": lambda: train_step(jmodel, jopt, *jargs, jx["target"]).block_until_ready(),
    }, args.repeats))
    # Profile: the achieved FLOP rate of each side (closed-form matmul FLOPs of bench/scale_plan.py)
    # against each library's own GEMM rate at the model's FFN shape (the largest matmul).
    from bench.scale_plan import closed_form_flops

    cf = closed_form_flops(jmodel.config, 320, 333, 1)
    m, k, n = 320 + 333, jmodel.config.width, jmodel.config.ffn_dim
    a, b = rng.standard_normal((m, k), dtype=np.float32), rng.standard_normal((k, n), dtype=np.float32)
    ja, jb = jnp.asarray(a, args.dtype), jnp.asarray(b, args.dtype)
    ta, tb = torch.from_numpy(a).to(getattr(torch, args.dtype)), torch.from_numpy(b).to(getattr(torch, args.dtype))
    jdot = jax.jit(jnp.dot)
    jdot(ja, jb).block_until_ready()
    gemm = _side_by_side({"torch": lambda: torch.mm(ta, tb), "jax": lambda: jdot(ja, jb).block_until_ready()}, 20 if not bf16 else 3)
    load1 = os.getloadavg()
    if args.no_roofline:
        peak = (float("nan"), "not measured")
    else:
        from bench.roofline import measured_peak

        peak = measured_peak(args.dtype, 1024)
    gemm_gflops = {kk: 2 * m * k * n / v / 1e9 for kk, v in gemm.items()}
    rates = {
        "forward_flops": cf["forward"], "train_step_flops": cf["model_train"],
        "torch_forward_gflops": cf["forward"] / res["torch_forward_s"] / 1e9,
        "jax_forward_gflops": cf["forward"] / res["jax_forward_s"] / 1e9,
        "torch_train_step_gflops": cf["model_train"] / res["torch_train_step_s"] / 1e9,
        "jax_train_step_gflops": cf["model_train"] / res["jax_train_step_s"] / 1e9,
        "torch_gemm_gflops": gemm_gflops["torch"], "jax_gemm_gflops": gemm_gflops["jax"], "gemm_shape": [m, k, n],
        "roofline_gflops": peak[0], "roofline_by": peak[1],
    }
    rates["jax_train_step_of_roofline"] = rates["jax_train_step_gflops"] / peak[0]
    rates["torch_train_step_of_roofline"] = rates["torch_train_step_gflops"] / peak[0]
    out = {
        "bench": "transformer",
        "rates": rates,
        "config": {"layers": args.layers, "heads": 8, "head_dim": 64, "latents": [5, 16, 16, 16], "video_tokens": 320,
                   "context_tokens": 333, "batch": 1, "dtype": args.dtype,
                   "param_dtype": "float32", "attention_kernel": jmodel.config.resolved_attention_kernel()},
        "loadavg_before": load0, "loadavg_after": load1,
        "jax_device": str(jax.devices()[0].platform),
        "jax_ratio_train_step": round(res["jax_train_step_s"] / res["torch_train_step_s"], 3),
        "torch_threads": torch.get_num_threads(),
        "repeats": args.repeats,
        **{k: round(v, 5) for k, v in res.items()},
        "jax_compile_forward_s": round(compile_fwd, 3),
        "jax_compile_train_step_s": round(compile_step, 3),
        "forward_speedup": round(res["torch_forward_s"] / res["jax_forward_s"], 3),
        "train_step_speedup": round(res["torch_train_step_s"] / res["jax_train_step_s"], 3),
    }
    print(f"transformer {args.layers} layers, 8 heads x 64, latents 5x16x16x16 (320 video tokens), 333 context tokens, "
          f"batch 1, {args.dtype} compute, float32 weights; JAX on {out['jax_device']} (attention {out['config']['attention_kernel']}), torch {out['torch_threads']} threads; median of {args.repeats}")
    print(f"{'':14s}{'torch (s)':>12s}{'jax (s)':>12s}{'jax/torch':>11s}{'jax compile (s)':>18s}")
    for name, key, comp in (("forward", "forward", compile_fwd), ("train step", "train_step", compile_step)):
        t, j = res[f"torch_{key}_s"], res[f"jax_{key}_s"]
        print(f"{name:14s}{t:12.4f}{j:12.4f}{j / t:11.2f}{comp:18.2f}")
    print(f"profile: matmul FLOPs (closed form) forward {cf['forward'] / 1e9:.1f} G, train step {cf['model_train'] / 1e9:.1f} G")
    print(f"{'achieved GFLOP/s':18s}{'torch':>10s}{'jax':>10s}")
    print(f"{'forward':18s}{rates['torch_forward_gflops']:10.1f}{rates['jax_forward_gflops']:10.1f}")
    print(f"{'train step':18s}{rates['torch_train_step_gflops']:10.1f}{rates['jax_train_step_gflops']:10.1f}")
    print(f"{'GEMM %dx%dx%d' % (m, k, n):18s}{gemm_gflops['torch']:10.1f}{gemm_gflops['jax']:10.1f}")
    print(f"roofline ({args.dtype} GEMM peak, bench/roofline.py): {peak[0]:.1f} GFLOP/s ({peak[1]}); train step "
          f"achieved/roofline: torch {rates['torch_train_step_of_roofline']:.2f}, jax {rates['jax_train_step_of_roofline']:.2f}")
    print(f"load average before {tuple(round(v, 2) for v in load0)}, after {tuple(round(v, 2) for v in load1)}")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
