"""Shared command-line front end of ``converters.from_diffusers`` and ``converters.to_diffusers``."""

from __future__ import annotations

import argparse
import logging
import sys

from converters import convert
from converters.common import CheckpointError


def main(direction: str, argv: list[str] | None = None) -> int:
    """Parse ``--component/--src/--dst`` and call ``converters.convert.<direction>(component, src, dst)``.

    Returns the process exit status: 0 on success, 1 on a conversion error (message on stderr,
    nothing written), 2 on bad arguments.
    """
    what = "diffusers -> contentv-jax" if direction == "from_diffusers" else "contentv-jax -> diffusers"
    parser = argparse.ArgumentParser(prog=f"python -m converters.{direction}", description=f"Convert a checkpoint ({what}).")
    parser.add_argument("--component", required=True, choices=convert.COMPONENTS, help="which model the checkpoint holds")
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
        getattr(convert, direction)(args.component, args.src, args.dst, **kwargs)
    except (CheckpointError, FileNotFoundError, NotADirectoryError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
