"""``python -m contentv_jax.train [--config FILE] [--data DIR] [--run-dir DIR] [--prompts FILE] [key=value ...]``

With no arguments: trains the tiny model on CPU on a synthetic moving-shapes dataset rendered into the
run directory, with tiny random text encoders and VAE (saved there and reloaded through the real
loading code). ``--data DIR``: video files plus ``captions.jsonl``; encoded once into the run dir.
``mode=rlhf`` (``configs/train/rlhf*.yaml``): reward-gradient fine-tuning on the prompts of ``--prompts FILE``
(``contentv_jax.train.rlhf_trainer``).
Distributed: ``--coordinator HOST:PORT --num-processes N --process-id I``, or the same from the
``CONTENTV_COORDINATOR`` / ``CONTENTV_NUM_PROCESSES`` / ``CONTENTV_PROCESS_ID`` variables alone; with
neither, ``jax.distributed.initialize()`` auto-detects a TPU slice, SLURM or Open MPI launch
(``contentv_jax.sharding.distributed.initialize``); a plain machine runs one process.
Exit status: 0 on completion (or a clean SIGTERM stop), 1 when stopped by non-finite losses, 2 on a bad config.
"""

from __future__ import annotations

import argparse
import sys

from contentv_jax.sharding.distributed import add_distributed_args, initialize_from_args


def main(argv=None) -> int:
    """CLI entry point of ``python -m contentv_jax.train``; returns the exit status (0 completed, 1 stopped by non-finite losses, 2 bad config)."""
    parser = argparse.ArgumentParser(prog="python -m contentv_jax.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None, help="a YAML file, or a shipped config name such as stage3 (default: "
                        "the shipped configs/train/tiny.yaml)")
    parser.add_argument("--data", default=None, help="directory of videos + captions.jsonl (sets data.dir)")
    parser.add_argument("--run-dir", default=None, help="where checkpoints, logs and caches go (sets run_dir)")
    parser.add_argument("--prompts", default=None, help="RLHF prompts, one per line or JSONL (sets prompts)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. steps=100")
    add_distributed_args(parser)
    args = parser.parse_args(argv)

    from contentv_jax.config import ConfigError
    from contentv_jax.train.config import load_train_config

    overrides = list(args.overrides)
    if args.data is not None:
        overrides.append(f"data.dir={args.data}")
    if args.run_dir is not None:
        overrides.append(f"run_dir={args.run_dir}")
    if args.prompts is not None:
        overrides.append(f"prompts={args.prompts}")
    try:
        cfg = load_train_config(args.config, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        initialize_from_args(args)  # flags, else CONTENTV_* environment variables; one process: a no-op
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from contentv_jax.train.trainer import Trainer

    try:  # a bad value found while setting up (e.g. an unknown vae.name) is a config error too
        if cfg.mode == "rlhf":
            from contentv_jax.train.rlhf_trainer import RLHFTrainer

            trainer = RLHFTrainer(cfg).setup()
        else:
            trainer = Trainer(cfg).setup()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = trainer.run()
    if not trainer.main and summary["status"].startswith("interrupted"):
        import jax

        print(f"process {jax.process_index()}: {summary['status']} at step {summary['final_step']}")
    if cfg.mode == "rlhf":
        if trainer.main:
            r = summary["rewards"]
            print(f"{summary['status']}: steps {summary['start_step']} -> {summary['final_step']}"
                  + (f", reward {r[0]:.4f} -> {r[-1]:.4f}" if r else "") + f"; run dir {summary['run_dir']}")
            for e in summary["eval"]:
                print(f"  step {e['step']}: held-out reward {e['eval/reward_mean']:.4f} +- {e['eval/reward_std']:.4f}")
        return 1 if summary["status"].startswith("stopped") else 0
    if trainer.main:
        losses = summary["losses"]
        print(f"{summary['status']}: steps {summary['start_step']} -> {summary['final_step']}", end="")
        if losses:
            print(f", loss {losses[0]:.4f} -> {losses[-1]:.4f}", end="")
        print(f"; run dir {summary['run_dir']}")
        skipped = summary["skipped_files"]
        print(f"encoded {summary['records']} clips; skipped {len(skipped)} file(s)" + (":" if skipped else ""))
        for s in skipped:
            print(f"  {s['file']}: {s['reason']}")
    return 1 if summary["status"].startswith("stopped") else 0


if __name__ == "__main__":
    sys.exit(main())
