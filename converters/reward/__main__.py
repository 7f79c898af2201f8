"""``python -m converters.reward``: a reward-model checkpoint (HF CLIP directory, safetensors or a PyTorch
state dict) -> our checkpoint. Apart from the name tables (``converters/reward/__init__.py``) because it loads
through :func:`contentv_jax.rewards_io.load_reward`, which uses those tables."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from converters.common import CheckpointError
from converters.reward import save_reward


def main(argv: list[str] | None = None) -> int:
    """``python -m converters.reward --name NAME --src PATH --dst DIR [--config JSON] [--tokenizer DIR]``.

    Returns 0 on success, 1 on a checkpoint error (message on stderr, nothing written); argparse exits 2
    on bad arguments.
    """
    from contentv_jax.models.reward import NAMES

    parser = argparse.ArgumentParser(prog="python -m converters.reward", description="Convert a reward-model checkpoint to ours.")
    parser.add_argument("--name", required=True, choices=[n for n in NAMES if n != "analytic"])
    parser.add_argument("--src", required=True, help="HF CLIP directory, .safetensors, or a PyTorch state-dict file")
    parser.add_argument("--dst", required=True, help="destination directory (written atomically)")
    parser.add_argument("--config", default=None,
                        help="model config JSON file (HF CLIPConfig for mps, open_clip model config for hps); default ViT-H-14")
    parser.add_argument("--tokenizer", default=None, help="CLIP tokenizer directory (mps: tokenizes the condition string)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from contentv_jax.rewards_io import load_reward

    try:
        config = json.loads(Path(args.config).read_text()) if args.config else None
        reward = load_reward(args.name, args.src, config=config, tokenizer=args.tokenizer)
        save_reward(args.dst, args.name, reward.model)
    except (CheckpointError, FileNotFoundError, NotADirectoryError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
