"""The contentv-8b train step at the report's scale, compiled ahead of time on simulated CPU devices.

For each resolution and (data, fsdp, sequence) split, the train step is lowered from abstract
shapes (nothing allocated) and compiled for the mesh. The model config comes from a training config
(``--config``, default ``configs/train/stage3.yaml``) through the trainer's own path
(``contentv_jax.checkpoints.transformer_config``, as ``Trainer`` calls it): its compute dtype (bfloat16), float32 params and
AdamW state, remat policy (full) and ``model.attention_kernel`` resolved for the simulated (CPU)
backend (``auto`` -> ``chunked``), with Ulysses over ``sequence``. It also prints, for every stage
config in ``configs/train/``, the kernel ``model.attention_kernel`` resolves to on CPU, GPU and TPU.
For each run it reports:
- per-device memory from ``memory_analysis()``: arguments + outputs + temporaries, with the params
  and AdamW state donated;
- the closed-form FLOPs per step: model FLOPs (3 x forward) and hardware FLOPs (plus remat, the
  flash backward's recompute, and padding);
- the step time at 50 % MFU on TPU v5p, TPU v6e and the report's 320 TFLOP/s NPU.

    python bench/scale_plan.py                       # 256 devices, Stage 3 and 720p, default splits
    python bench/scale_plan.py --config configs/train/stage2.yaml model.attention_kernel=xla   # another setting
    python bench/scale_plan.py --devices 16 --layers 2 --splits 2,4,2 --resolutions stage3   # quick check
    python bench/scale_plan.py --config configs/train/sft.yaml --verify-mesh none   # the SFT rows
    python bench/scale_plan.py --rlhf 1,4 --resolutions rlhf --splits "2,16,8;4,8,8" --verify-mesh none

RLHF rows (``--rlhf K,...``; ContentV report section 6.2): the whole RLHF step of
``contentv_jax.train.rlhf.make_rlhf_step`` at 29x432x768 (8 x 27 x 48 = 10,368 video tokens) with the MPS reward
(ViT-H/14 CLIP + cross-attention head) and the Wan2.1 VAE decoding the first latent frame: the N-step rollout
(``--rlhf-steps``, CFG batched: 2B per forward), the reward gradient, k VJPs one at a time, AdamW. Closed-form
FLOPs: ``N`` forwards plus ``k`` train steps (3 forwards, +1 with full remat) of the MM-DiT at batch 2B; the VAE
frame decode and MPS (forward + backward) come from ``cost_analysis()`` of their own compiled gradient, which
has no loops.

FLOP check: XLA's ``cost_analysis()`` counts a while loop's body once. That covers the scanned
blocks and the chunked kernel's loops, so the full model's compiler figure is not a per-step total
(it is in the JSON only, as ``compiler_flops_per_device_loops_once``). The closed form is instead
checked against ``cost_analysis()`` on a loop-free variant: 2 layers (a scan of length 1 plus the
final block), the ``xla`` attention kernel, the real width and token counts, on ``--verify-mesh``.
The compiler's FLOPs are summed over that mesh's devices.

Prints a table, then as its last line one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

RESOLUTIONS = {  # (frames, height, width) in pixels -> Wan VAE latents (4x time, 8x space), 2x2 patches
    "stage3": (125, 432, 768),  # 41,472 video tokens
    "720p": (125, 720, 1280),  # 115,200 video tokens
    "rlhf": (29, 432, 768),  # 10,368 video tokens (the report's RLHF clips)
}
PEAK_BF16 = {"tpu-v5p": 459e12, "tpu-v6e": 918e12, "npu-320": 320e12}
TEXT_TOKENS = 333

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from contentv_jax.models.flops import closed_form_flops  # noqa: E402  (the one closed form; the trainer logs it too)


def latent_shape(frames: int, height: int, width: int) -> tuple[int, int, int]:
    return (frames - 1) // 4 + 1, height // 8, width // 8


def param_count(cfg) -> int:
    """Parameters of the MM-DiT (closed form, for the memory budget)."""
    d, f, p = cfg.width, cfg.ffn_dim, cfg.patch_size
    hd = cfg.attention_head_dim
    lin = lambda i, o: i * o + o  # noqa: E731
    full = 2 * lin(d, 6 * d) + 8 * lin(d, d) + 4 * hd + 2 * (lin(d, f) + lin(f, d))
    final = lin(d, 6 * d) + lin(d, 2 * d) + 7 * lin(d, d) + 4 * hd + lin(d, f) + lin(f, d)
    embed = (p * p * cfg.in_channels * d + d + lin(cfg.joint_attention_dim, d) + lin(256, d) + lin(d, d)
             + lin(cfg.pooled_projection_dim, d) + lin(d, d) + lin(d, 2 * d) + lin(d, p * p * cfg.out_channels))
    return (cfg.num_layers - 1) * full + final + embed


def build_step(cfg, mesh, latent: tuple[int, int, int], batch: int, *, reference: bool = False):
    """Lower and compile the train step (MSE on the velocity, AdamW) for ``cfg`` on ``mesh`` from
    abstract shapes: float32 params and AdamW moments sharded by the logical rules and donated,
    bfloat16 inputs sharded over (data x fsdp). ``reference``: the SFT step (ContentV report section 6.1,
    ``contentv_jax.train.sft``): a frozen bfloat16 copy of the parameters, sharded like them and not
    donated, runs one more forward on the same input and the loss adds ``mean((v - sg(v_ref))^2)``.
    Returns (compiled, compile seconds, parameter count)."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from contentv_jax.models.transformer import MMDiT
    from contentv_jax.sharding.init import abstract_sharded
    from contentv_jax.sharding.logical import activation_sharding

    tx = optax.adamw(1e-4, weight_decay=0.0)
    lt, lh, lw = latent
    graphdef, params, p_sh = abstract_sharded(lambda: MMDiT(cfg, rngs=nnx.Rngs(0)), mesh)
    unbox = lambda tree: jax.tree.map(lambda v: v.get_value(), tree, is_leaf=lambda x: isinstance(x, nnx.Variable))  # noqa: E731
    p_sh, params = unbox(p_sh), unbox(params)
    n_params = sum(x.size for x in jax.tree.leaves(params))
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

    def step(params, opt_state, b, ref=None):
        def loss(p):
            args = (b["latents"], b["timestep"], b["context"], b["pooled"])
            out = nnx.merge(graphdef, p)(*args).astype(jnp.float32)
            value = jnp.mean((out - b["target"].astype(jnp.float32)) ** 2)
            if ref is not None:
                v_ref = jax.lax.stop_gradient(nnx.merge(graphdef, ref)(*args).astype(jnp.float32))
                value = value + jnp.mean((out - v_ref) ** 2)
            return value

        with activation_sharding(mesh):
            value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    in_sh = (p_sh, opt_sh, bsh) + ((p_sh,) if reference else ())
    jitted = jax.jit(step, in_shardings=in_sh, out_shardings=(p_sh, opt_sh, repl), donate_argnums=(0, 1))
    abstract = (params, opt, batch_abs)
    if reference:
        abstract += (jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16, sharding=x.sharding), params),)
    t0 = time.perf_counter()
    compiled = jitted.lower(*abstract).compile()
    return compiled, time.perf_counter() - t0, n_params


def build_rlhf_step(cfg, mesh, latent: tuple[int, int, int], batch: int, k: int, num_steps: int):
    """Lower and compile the RLHF step (``contentv_jax.train.rlhf.make_rlhf_step``, mode random) with the MPS reward
    and the Wan2.1 VAE on ``mesh`` from abstract shapes: float32 params and AdamW moments sharded and donated;
    VAE and MPS parameters (float32) replicated. Returns (compiled, compile seconds, reward+decode compiled)."""
    import dataclasses

    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from contentv_jax.models.reward import MPSConfig, MPSModel
    from contentv_jax.models.transformer import MMDiT
    from contentv_jax.models.vae import WanVAE, get_config as vae_config
    from contentv_jax.sharding.init import abstract_sharded
    from contentv_jax.sharding.logical import activation_sharding
    from contentv_jax.train import rlhf

    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-5, weight_decay=0.0))
    lt, lh, lw = latent
    graphdef, params, p_sh = abstract_sharded(lambda: MMDiT(cfg, rngs=nnx.Rngs(0)), mesh)
    unbox = lambda tree: jax.tree.map(lambda v: v.get_value(), tree, is_leaf=lambda x: isinstance(x, nnx.Variable))  # noqa: E731
    p_sh, params = unbox(p_sh), unbox(params)
    repl = NamedSharding(mesh, P())
    opt = jax.eval_shape(tx.init, params)
    opt_sh = jax.tree.map(lambda _: repl, opt)
    opt_sh = (opt_sh[0], (opt_sh[1][0]._replace(mu=p_sh, nu=p_sh),) + tuple(opt_sh[1][1:]))
    mps_cfg = dataclasses.replace(MPSConfig(), condition_ids=tuple(range(77)))
    with nnx.use_eager_sharding(False):
        vae = nnx.eval_shape(lambda: WanVAE(vae_config("wan2.1"), rngs=nnx.Rngs(0)))
        mps = nnx.eval_shape(lambda: MPSModel(mps_cfg, rngs=nnx.Rngs(0)))
    vae_graphdef, vae_state = nnx.split(vae)
    r_graphdef, r_state = nnx.split(mps)
    sds = jax.ShapeDtypeStruct
    aux = {"vae": jax.tree.map(lambda x: sds(x.shape, x.dtype, sharding=repl), vae_state),
           "reward": jax.tree.map(lambda x: sds(x.shape, x.dtype, sharding=repl), r_state), "ref": None}

    def apply(p, x, t, c, pooled):
        return nnx.merge(graphdef, p)(x.astype(jnp.bfloat16), t, c.astype(jnp.bfloat16), pooled.astype(jnp.bfloat16))

    rcfg = rlhf.RLHFSection(num_steps=num_steps, k=k, mode="random", num_frames=(lt - 1) * 4 + 1,
                            height=lh * 8, width=lw * 8, batch=batch)
    shape = (batch, lt, lh, lw, cfg.in_channels)
    step_fn = rlhf.make_rlhf_step(apply, rlhf.make_reward_apply(r_graphdef), vae_graphdef, tx, rcfg, shape)
    bsh = NamedSharding(mesh, P(("data", "fsdp")))
    batch_abs = {
        "context": sds((batch, TEXT_TOKENS, cfg.joint_attention_dim), jnp.bfloat16, sharding=bsh),
        "pooled": sds((batch, cfg.pooled_projection_dim), jnp.bfloat16, sharding=bsh),
        "negative_context": sds((batch, TEXT_TOKENS, cfg.joint_attention_dim), jnp.bfloat16, sharding=bsh),
        "negative_pooled": sds((batch, cfg.pooled_projection_dim), jnp.bfloat16, sharding=bsh),
        "input_ids": sds((batch, 77), jnp.int32, sharding=bsh),
    }
    state_abs = {"step": sds((), jnp.int32, sharding=repl), "rng": sds((2,), jnp.uint32, sharding=repl),
                 "params": params, "opt_state": opt}
    state_sh = {"step": repl, "rng": repl, "params": p_sh, "opt_state": opt_sh}

    def step(state, b, aux):
        with activation_sharding(mesh):
            return step_fn(state, b, aux)

    jitted = jax.jit(step, in_shardings=(state_sh, bsh, None), out_shardings=(state_sh, None), donate_argnums=(0,))
    t0 = time.perf_counter()
    compiled = jitted.lower(state_abs, batch_abs, aux).compile()
    compile_s = time.perf_counter() - t0

    def reward_grad(x_n, aux, ids):
        vae_m = nnx.merge(vae_graphdef, aux["vae"])
        return jax.grad(lambda x: jnp.sum(rlhf.make_reward_apply(r_graphdef)(aux["reward"], rlhf.decode_frame(vae_m, x, 0), ids)))(x_n)

    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    aux1 = jax.tree.map(lambda x: sds(x.shape, x.dtype, sharding=one), {k: aux[k] for k in ("vae", "reward")})
    rg = jax.jit(reward_grad).lower(sds((1, lt, lh, lw, cfg.in_channels), jnp.float32, sharding=one), aux1,
                                    sds((1, 77), jnp.int32, sharding=one)).compile()
    return compiled, compile_s, rg


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=256)
    ap.add_argument("--splits", default="16,16,1;8,8,4;4,8,8;2,16,8",
                    help="';'-separated data,fsdp,sequence (each multiplying to --devices)")
    ap.add_argument("--resolutions", default="stage3,720p")
    ap.add_argument("--layers", type=int, default=None, help="override num_layers (quick checks)")
    ap.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "train" / "stage3.yaml"),
                    help="training config whose model is planned (through the trainer's config path)")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="training-config overrides, e.g. model.attention_kernel=xla")
    ap.add_argument("--batch-per-shard", type=int, default=1, help="samples per (data x fsdp) shard")
    ap.add_argument("--rlhf", default="", help="k values: plan the RLHF step instead of the train step, e.g. 1,4")
    ap.add_argument("--rlhf-steps", type=int, default=50, help="Euler steps N of the RLHF rollout")
    ap.add_argument("--verify-mesh", default="1,2,1",
                    help="data,fsdp,sequence of the FLOP check (2 layers, xla kernel); 'none' to skip")
    args = ap.parse_args(argv)

    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import jax

    from contentv_jax.config import ConfigError
    from contentv_jax.sharding.mesh import MeshConfig, create_mesh
    from contentv_jax.train.config import load_train_config
    from contentv_jax.checkpoints import transformer_config

    # The run's own model config: the stage's dtype, float32 params (so float32 AdamW moments), remat,
    # attention kernel. model.init=random: a stage's init checkpoint has the named architecture.
    try:
        train_cfg = load_train_config(args.config, list(args.overrides))
        cfg, _ = transformer_config(dataclasses.replace(train_cfg.model, init="random"))
        kernel = cfg.resolved_attention_kernel()
    except (ConfigError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    cfg = cfg.replace(attention_kernel=kernel)  # what the built model runs on this (CPU) backend
    if args.layers:
        cfg = cfg.replace(num_layers=args.layers)
    stage_kernels = {}
    for stage in sorted((Path(__file__).resolve().parents[1] / "configs" / "train").glob("*.yaml")):
        scfg, _ = transformer_config(dataclasses.replace(load_train_config(stage).model, init="random"))
        stage_kernels[stage.stem] = {b: scfg.resolved_attention_kernel(b) for b in ("cpu", "gpu", "tpu")}
        print(f"{stage.name:20s} model.attention_kernel={scfg.attention_kernel!r} -> "
              + ", ".join(f"{b}: {k}" for b, k in stage_kernels[stage.stem].items()), flush=True)
    print(f"planned: {args.config} ({train_cfg.model.name}), model.attention_kernel={train_cfg.model.attention_kernel!r} "
          f"-> {kernel} on the simulated {jax.default_backend()} devices", flush=True)
    resolutions = args.resolutions.split(",")
    for res in resolutions:
        if res not in RESOLUTIONS:
            raise SystemExit(f"--resolutions: unknown {res!r}; known {sorted(RESOLUTIONS)}")
    print(f"contentv-8b train step: {cfg.num_layers} layers, width {cfg.width}, dtype {cfg.dtype}, params "
          f"{cfg.param_dtype} (AdamW moments float32), remat {cfg.remat_policy}, attention {cfg.attention_kernel}, "
          f"{args.devices} simulated CPU devices", flush=True)

    # 1) FLOP check: XLA's cost analysis counts a while loop's body once (the scanned blocks, and the
    # chunked kernel's loops), so check the closed form on a variant with no loops: 2 layers (a scan
    # of length 1 + the final block), the xla attention kernel, real width and token counts.
    checks = []
    if args.verify_mesh != "none":
        vshape = tuple(int(x) for x in args.verify_mesh.split(","))
        vn = vshape[0] * vshape[1] * vshape[2]
        vcfg = cfg.replace(num_layers=2, attention_kernel="xla")
        vmesh = create_mesh(MeshConfig(*vshape), devices=jax.devices()[:vn])
        for res in resolutions:
            lat = latent_shape(*RESOLUTIONS[res])
            video_tokens = lat[0] * (lat[1] // cfg.patch_size) * (lat[2] // cfg.patch_size)
            batch = vshape[0] * vshape[1] * args.batch_per_shard
            compiled, cs, _ = build_step(vcfg, vmesh, lat, batch)
            xla_total = _flops(compiled) * vn
            cf = closed_form_flops(vcfg, video_tokens, TEXT_TOKENS, batch, sequence=vshape[2])
            checks.append({"resolution": res, "mesh": vshape, "layers": 2, "kernel": "xla", "global_batch": batch,
                           "compiler_flops_total": xla_total, "closed_form_hardware_flops": cf["hardware_train"],
                           "ratio": xla_total / cf["hardware_train"], "compile_s": cs})
            print(f"FLOP check {res}: 2 layers, xla kernel, mesh {vshape}, batch {batch}: compiler "
                  f"{xla_total:.4e} (summed over {vn} devices) vs closed form {cf['hardware_train']:.4e} "
                  f"-> ratio {xla_total / cf['hardware_train']:.4f} [compile {cs:.0f}s]", flush=True)

    if args.rlhf:
        return _rlhf_plan(args, cfg, resolutions)
    # SFT configs (sft.kl_weight > 0) plan the SFT step: params + AdamW + the frozen bfloat16 reference
    sft = train_cfg.sft.kl_weight > 0
    if sft:
        print(f"SFT step: sft.kl_weight={train_cfg.sft.kl_weight}: + a frozen bfloat16 reference (sharded like the "
              "params, not donated) and its forward", flush=True)

    # 2) The plan: per-device memory of the real step on each split; FLOPs from the verified closed form.
    rows = []
    n_params = None
    for res in resolutions:
        lat = latent_shape(*RESOLUTIONS[res])
        video_tokens = lat[0] * (lat[1] // cfg.patch_size) * (lat[2] // cfg.patch_size)
        for split in args.splits.split(";"):
            shape = tuple(int(x) for x in split.split(","))
            mesh = create_mesh(MeshConfig(*shape))
            batch = shape[0] * shape[1] * args.batch_per_shard
            compiled, compile_s, n_params = build_step(cfg, mesh, lat, batch, reference=sft)
            mem = compiled.memory_analysis()
            per_dev = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
                       + mem.temp_size_in_bytes)
            cf = closed_form_flops(cfg, video_tokens, TEXT_TOKENS, batch, sequence=shape[2])
            if sft:  # + the frozen reference's forward on the same input
                cf = dict(cf, model_train=cf["model_train"] + cf["forward"], hardware_train=cf["hardware_train"] + cf["forward"])
            row = {
                "kind": "sft" if sft else "train", "resolution": res, "video_tokens": video_tokens, "text_tokens": TEXT_TOKENS, "mesh": shape,
                "global_batch": batch, "per_device_gib": per_dev / 2**30,
                "args_gib": mem.argument_size_in_bytes / 2**30, "temp_gib": mem.temp_size_in_bytes / 2**30,
                "fits_32gb": per_dev <= 32e9,
                "model_flops_per_step": cf["model_train"], "hardware_flops_per_step": cf["hardware_train"],
                "attention_share_of_forward": cf["attention_share"],
                "compiler_flops_per_device_loops_once": _flops(compiled), "compile_s": compile_s,
            }
            for name, peak in PEAK_BF16.items():
                row[f"step_s_50mfu_{name}"] = cf["model_train"] / (args.devices * peak * 0.5)
            rows.append(row)
            print(f"{'SFT ' if sft else ''}{res:7s} tokens {video_tokens:6d}+{TEXT_TOKENS} mesh {str(shape):12s} batch {batch:4d}: "
                  f"{row['per_device_gib']:6.2f} GiB/device (args {row['args_gib']:.2f}, temp {row['temp_gib']:.2f}) "
                  f"{'fits' if row['fits_32gb'] else 'OVER'} 32 GB | model {cf['model_train']:.3e} flop/step "
                  f"(hardware {cf['hardware_train']:.3e}) | 50% MFU step: v5p {row['step_s_50mfu_tpu-v5p']:.2f}s "
                  f"v6e {row['step_s_50mfu_tpu-v6e']:.2f}s npu {row['step_s_50mfu_npu-320']:.2f}s "
                  f"[compile {compile_s:.0f}s]", flush=True)
    if n_params is not None:
        print(f"parameters: {n_params:,} (closed form {param_count(cfg):,})")
    print(json.dumps({"bench": "scale_plan", "devices": args.devices, "layers": cfg.num_layers,
                      "train_config": str(args.config), "stage_kernels": stage_kernels,
                      "config": {k: getattr(cfg, k) for k in ("dtype", "param_dtype", "remat_policy", "attention_kernel")},
                      "params": n_params, "flop_checks": checks, "rows": rows}))
    return 0


def _rlhf_plan(args, cfg, resolutions) -> int:
    """The RLHF rows: per-device memory, FLOPs (closed form + VAE/MPS from the compiler), 50 % MFU step time."""
    from contentv_jax.sharding.mesh import MeshConfig, create_mesh

    rows = []
    for res in resolutions:
        lat = latent_shape(*RESOLUTIONS[res])
        video_tokens = lat[0] * (lat[1] // cfg.patch_size) * (lat[2] // cfg.patch_size)
        for split in args.splits.split(";"):
            shape = tuple(int(x) for x in split.split(","))
            mesh = create_mesh(MeshConfig(*shape))
            batch = shape[0] * shape[1] * args.batch_per_shard
            for k in (int(x) for x in args.rlhf.split(",")):
                compiled, compile_s, rg = build_rlhf_step(cfg, mesh, lat, batch, k, args.rlhf_steps)
                mem = compiled.memory_analysis()
                per_dev = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
                           + mem.temp_size_in_bytes)
                cf = closed_form_flops(cfg, video_tokens, TEXT_TOKENS, 2 * batch, sequence=shape[2])  # CFG: 2B
                fwd = cf["model_train"] / 3
                model = args.rlhf_steps * fwd + k * cf["model_train"]
                hardware = args.rlhf_steps * fwd + k * (cf["hardware_train"])
                reward_flops = _flops(rg) * batch  # VAE first-frame decode + MPS, forward + backward, per sample
                row = {
                    "kind": "rlhf", "k": k, "rollout_steps": args.rlhf_steps, "resolution": res,
                    "video_tokens": video_tokens, "mesh": shape, "global_batch": batch,
                    "per_device_gib": per_dev / 2**30, "args_gib": mem.argument_size_in_bytes / 2**30,
                    "temp_gib": mem.temp_size_in_bytes / 2**30, "fits_32gb": per_dev <= 32e9,
                    "model_flops_per_step": model + reward_flops, "transformer_model_flops": model,
                    "transformer_hardware_flops": hardware, "vae_mps_flops": reward_flops, "compile_s": compile_s,
                }
                for name, peak in PEAK_BF16.items():
                    row[f"step_s_50mfu_{name}"] = row["model_flops_per_step"] / (args.devices * peak * 0.5)
                rows.append(row)
                print(f"RLHF k={k} N={args.rlhf_steps} {res} tokens {video_tokens} mesh {str(shape):12s} batch {batch:4d}: "
                      f"{row['per_device_gib']:6.2f} GiB/device (args {row['args_gib']:.2f}, temp {row['temp_gib']:.2f}) "
                      f"{'fits' if row['fits_32gb'] else 'OVER'} 32 GB | model {row['model_flops_per_step']:.3e} flop/step "
                      f"(transformer {model:.3e}, VAE+MPS {reward_flops:.3e}) | 50% MFU step: "
                      f"v5p {row['step_s_50mfu_tpu-v5p']:.2f}s v6e {row['step_s_50mfu_tpu-v6e']:.2f}s "
                      f"npu {row['step_s_50mfu_npu-320']:.2f}s [compile {compile_s:.0f}s]", flush=True)
    print(json.dumps({"bench": "scale_plan_rlhf", "devices": args.devices, "layers": cfg.num_layers, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
