"""Shared command-line front end of ``converters.from_diffusers`` and ``converters.to_diffusers``."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMPONENTS = ("transformer", "vae")


def main(direction: str, argv: list[str] | None = None) -> int:
    """Parse ``--component/--src/--dst`` and call ``converters.<component>.<direction>(src, dst)``.

    Returns the process exit status: 0 on success; 2 on bad input (bad arguments, or a source that
    is not a valid checkpoint: the message, one line naming the file or tensor, on stderr, nothing
    written at the destination); 1 when the converter for the component is missing.
    """
    from converters.common import CheckpointError

    what = "diffusers -> contentv-jax" if direction == "from_diffusers" else "contentv-jax -> diffusers"
    parser = argparse.ArgumentParser(prog=f"python -m converters.{direction}", description=f"Convert a checkpoint ({what}).")
    parser.add_argument("--component", required=True, choices=COMPONENTS, help="which model the checkpoint holds")
    parser.add_argument("--src", required=True, help="source directory")
    parser.add_argument("--dst", required=True, help="destination directory (written atomically)")
    if direction == "to_diffusers":
        parser.add_argument("--max-shard-size", type=int, default=None,
                            help="bytes per safetensors shard (default: the component's, 10 GiB)")
    args = parser.parse_args(argv)
    kwargs = {}
    if getattr(args, "max_shard_size", None) is not None:
        kwargs["max_shard_size"] = args.max_shard_size
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("converters").setLevel(logging.INFO)
    try:
        module = importlib.import_module(f"converters.{args.component}")
    except ModuleNotFoundError as e:
        if e.name != f"converters.{args.component}":
            raise
        print(f"error: no converter for component {args.component!r} (converters/{args.component}.py is missing)", file=sys.stderr)
        return 1
    try:
        getattr(module, direction)(args.src, args.dst, **kwargs)
    except (CheckpointError, FileNotFoundError, NotADirectoryError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
