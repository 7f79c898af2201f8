"""``python -m converters`` / ``contentv-convert``: ``{from-diffusers,to-diffusers} --component ... --src ... --dst ...``.

The same as ``python -m converters.from_diffusers`` / ``python -m converters.to_diffusers``, under one command.
Exit status: 0 converted, 1 a conversion error (named on stderr, nothing written), 2 bad arguments.
"""

from __future__ import annotations

import sys

DIRECTIONS = {"from-diffusers": "from_diffusers", "to-diffusers": "to_diffusers"}


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``argv[0]`` (``from-diffusers`` or ``to-diffusers``) to :func:`converters._cli.main`."""
    from converters._cli import main as convert

    argv = list(sys.argv[1:] if argv is None else argv)
    direction = DIRECTIONS.get(argv[0].replace("_", "-")) if argv else None
    if direction is None:
        print(
            "usage: contentv-convert {from-diffusers,to-diffusers} --component {transformer,vae} --src DIR --dst DIR\n"
            f"error: the first argument must be one of {sorted(DIRECTIONS)}, got {argv[0] if argv else 'nothing'!r}",
            file=sys.stderr,
        )
        return 2
    return convert(direction, argv[1:])


if __name__ == "__main__":
    sys.exit(main())
