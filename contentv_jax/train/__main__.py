"""``python -m contentv_jax.train [--config FILE] [--data DIR] [--run-dir DIR] [--prompts FILE] [key=value ...]``

With no arguments: trains the tiny model on CPU on a synthetic moving-shapes dataset rendered into the
run directory, with tiny random text encoders and VAE (saved there and reloaded through the real
loading code). ``--data DIR``: video files plus ``captions.jsonl``; encoded once into the run dir.
``mode=rlhf`` (``configs/train/rlhf*.yaml``): reward-gradient fine-tuning on the prompts of ``--prompts FILE``
(``contentv_jax.train.rlhf_trainer``).
Distributed: ``--coordinator HOST:PORT --num-processes N --process-id I``.
Exit status: 0 on completion (or a clean SIGTERM stop), 1 when stopped by non-finite losses, 2 on a bad config.
"""

from __future__ import annotations

import argparse
import sys


def _add_distributed_args(parser: argparse.ArgumentParser) -> None:
    try:
        from contentv_jax.sharding.distributed import add_distributed_args
    except ImportError:
        g = parser.add_argument_group("distributed (multi-host)")
        g.add_argument("--coordinator", default=None, help="HOST:PORT of process 0")
        g.add_argument("--num-processes", type=int, default=None)
        g.add_argument("--process-id", type=int, default=None)
        return
    add_distributed_args(parser)


def _initialize(args) -> None:
    if args.coordinator is None:
        return
    try:
        from contentv_jax.sharding.distributed import initialize
    except ImportError:
        import jax

        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
        return
    initialize(args.coordinator, args.num_processes, args.process_id)


def main(argv=None) -> int:
    """CLI entry point of ``python -m contentv_jax.train``; returns the exit status (0 completed, 1 stopped by non-finite losses, 2 bad config)."""
    parser = argparse.ArgumentParser(prog="python -m contentv_jax.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None, help="a YAML file (default: configs/train/tiny.yaml)")
    parser.add_argument("--data", default=None, help="directory of videos + captions.jsonl (sets data.dir)")
    parser.add_argument("--run-dir", default=None, help="where checkpoints, logs and caches go (sets run_dir)")
    parser.add_argument("--prompts", default=None, help="RLHF prompts, one per line or JSONL (sets prompts)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. steps=100")
    _add_distributed_args(parser)
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
    _initialize(args)

    from contentv_jax.train.trainer import Trainer

    try:
        if cfg.mode == "rlhf":
            from contentv_jax.train.rlhf_trainer import RLHFTrainer

            trainer = RLHFTrainer(cfg)
        else:
            trainer = Trainer(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = trainer.setup().run()
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
