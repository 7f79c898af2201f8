"""The contentv-8b train step at the report's scale, compiled ahead of time on simulated CPU devices.

For each resolution and (data, fsdp, sequence) split: the train step (bfloat16 compute, float32 params
and AdamW state, full remat, Ulysses with the chunked attention kernel) is lowered from abstract
shapes (nothing allocated) and compiled for the mesh; it reports per-device memory
(``memory_analysis()``: arguments + outputs + temporaries, with the params and AdamW state donated),
the compiler's FLOPs (``cost_analysis()``, per device), a closed-form FLOP count, and the step time at
50 % MFU on TPU v5p, TPU v6e and the report's 320 TFLOP/s NPU.

    python bench/scale_plan.py                       # 256 devices, Stage 3 and 720p, default splits
    python bench/scale_plan.py --devices 16 --layers 2 --splits 2,4,2 --resolutions stage3   # quick check

Caveat: XLA's cost analysis counts a scanned (while-loop) body once, so the compiler's figure covers
the unscanned parts plus one block; the closed form is the per-step total. Prints a table, then one
JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

RESOLUTIONS = {  # (frames, height, width) in pixels -> Wan VAE latents (4x time, 8x space), 2x2 patches
    "stage3": (125, 432, 768),  # 41,472 video tokens
    "720p": (125, 720, 1280),  # 115,200 video tokens
}
PEAK_BF16 = {"tpu-v5p": 459e12, "tpu-v6e": 918e12, "npu-320": 320e12}
TEXT_TOKENS = 333


def latent_shape(frames: int, height: int, width: int) -> tuple[int, int, int]:
    return (frames - 1) // 4 + 1, height // 8, width // 8


def closed_form_flops(cfg, video_tokens: int, text_tokens: int, batch: int) -> dict:
    """Matmul FLOPs (2 per multiply-add) of one forward, and of a train step without / with full remat."""
    d, f, n_layers = cfg.width, cfg.ffn_dim, cfg.num_layers
    s, t = video_tokens, text_tokens
    per_layer = (
        4 * 2 * (s + t) * d * d  # q, k, v, out projections for video and text tokens
        + 2 * 2 * (s + t) * d * f  # the two FFN matmuls
        + 2 * 2 * (s + t) ** 2 * d  # QK^T and PV over all heads
        + 2 * 2 * d * 6 * d  # AdaLN-zero modulation (video and text)
    )
    patch = 2 * s * (cfg.patch_size**2 * cfg.in_channels) * d * 2  # patch embed + unpatchify
    fwd = batch * (n_layers * per_layer + patch + 2 * t * cfg.joint_attention_dim * d)
    return {"forward": fwd, "train": 3 * fwd, "train_remat": 4 * fwd}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=256)
    ap.add_argument("--splits", default="32,8,1;16,8,2;8,8,4;4,8,8;2,16,8",
                    help="';'-separated data,fsdp,sequence (each multiplying to --devices)")
    ap.add_argument("--resolutions", default="stage3,720p")
    ap.add_argument("--layers", type=int, default=None, help="override num_layers (quick checks)")
    ap.add_argument("--kernel", default="chunked")
    ap.add_argument("--batch-per-shard", type=int, default=1, help="samples per (data x fsdp) shard")
    args = ap.parse_args(argv)

    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from contentv_jax.models.transformer import MMDiT, get_config
    from contentv_jax.sharding.init import abstract_sharded
    from contentv_jax.sharding.logical import activation_sharding
    from contentv_jax.sharding.mesh import MeshConfig, create_mesh

    overrides = {"attention_kernel": args.kernel}
    if args.layers:
        overrides["num_layers"] = args.layers
    cfg = get_config("contentv-8b", **overrides)
    tx = optax.adamw(1e-4, weight_decay=0.0)
    rows = []
    for res in args.resolutions.split(","):
        lt, lh, lw = latent_shape(*RESOLUTIONS[res])
        video_tokens = lt * (lh // cfg.patch_size) * (lw // cfg.patch_size)
        for split in args.splits.split(";"):
            shape = tuple(int(x) for x in split.split(","))
            mesh = create_mesh(MeshConfig(*shape))
            batch = shape[0] * shape[1] * args.batch_per_shard
            graphdef, params, p_sh = abstract_sharded(lambda: MMDiT(cfg, rngs=nnx.Rngs(0)), mesh)
            p_sh = jax.tree.map(lambda v: v.get_value(), p_sh, is_leaf=lambda x: isinstance(x, nnx.Variable))
            params = jax.tree.map(lambda v: v.get_value(), params, is_leaf=lambda x: isinstance(x, nnx.Variable))
            repl = NamedSharding(mesh, P())
            opt = jax.eval_shape(tx.init, params)
            opt_sh = jax.tree.map(lambda _: repl, opt)
            opt_sh = (opt_sh[0]._replace(mu=p_sh, nu=p_sh),) + tuple(opt_sh[1:])
            bsh = NamedSharding(mesh, P(("data", "fsdp")))
            sds = jax.ShapeDtypeStruct
            batch_abs = {
                "latents": sds((batch, lt, lh, lw, cfg.in_channels), jnp.bfloat16, sharding=bsh),
                "target": sds((batch, lt, lh, lw, cfg.in_channels), jnp.bfloat16, sharding=bsh),
                "timestep": sds((batch,), jnp.float32, sharding=bsh),
                "context": sds((batch, TEXT_TOKENS, cfg.joint_attention_dim), jnp.bfloat16, sharding=bsh),
                "pooled": sds((batch, cfg.pooled_projection_dim), jnp.bfloat16, sharding=bsh),
            }

            def step(params, opt_state, b):
                def loss(p):
                    out = nnx.merge(graphdef, p)(b["latents"], b["timestep"], b["context"], b["pooled"])
                    return jnp.mean((out.astype(jnp.float32) - b["target"].astype(jnp.float32)) ** 2)

                with activation_sharding(mesh):
                    value, grads = jax.value_and_grad(loss)(params)
                updates, opt_state = tx.update(grads, opt_state, params)
                return optax.apply_updates(params, updates), opt_state, value

            jitted = jax.jit(step, in_shardings=(p_sh, opt_sh, bsh), out_shardings=(p_sh, opt_sh, repl),
                             donate_argnums=(0, 1))
            t0 = time.perf_counter()
            lowered = jitted.lower(params, opt, batch_abs)
            compiled = lowered.compile()
            compile_s = time.perf_counter() - t0
            mem = compiled.memory_analysis()
            cost = compiled.cost_analysis()
            cost = cost[0] if isinstance(cost, (list, tuple)) else cost
            per_dev = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
                       + mem.temp_size_in_bytes)
            cf = closed_form_flops(cfg, video_tokens, TEXT_TOKENS, batch)
            row = {
                "resolution": res, "video_tokens": video_tokens, "mesh": shape, "global_batch": batch,
                "per_device_gib": per_dev / 2**30, "args_gib": mem.argument_size_in_bytes / 2**30,
                "temp_gib": mem.temp_size_in_bytes / 2**30, "compiler_flops_per_device": cost.get("flops"),
                "closed_form_train_flops": cf["train"], "closed_form_train_remat_flops": cf["train_remat"],
                "compile_s": compile_s,
            }
            for name, peak in PEAK_BF16.items():
                row[f"step_s_50mfu_{name}"] = cf["train"] / (args.devices * peak * 0.5)
            rows.append(row)
            print(f"{res:7s} tokens {video_tokens:7d} mesh {shape} batch {batch:4d}: {row['per_device_gib']:7.2f} GiB/device "
                  f"(temp {row['temp_gib']:.2f}), compiler {row['compiler_flops_per_device'] or 0:.3e} flop/device, "
                  f"closed form {cf['train']:.3e} flop/step, 50% MFU step v5p {row['step_s_50mfu_tpu-v5p']:.2f}s "
                  f"v6e {row['step_s_50mfu_tpu-v6e']:.2f}s npu {row['step_s_50mfu_npu-320']:.2f}s "
                  f"[compile {compile_s:.0f}s]", flush=True)
    print(json.dumps({"bench": "scale_plan", "devices": args.devices, "layers": cfg.num_layers, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
