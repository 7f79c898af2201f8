"""Where sampled videos go: file names that fit the file system, and the name -> prompt map beside them.

Used by ``python -m contentv_jax.sample`` and by the trainer's previews (``contentv_jax.train.preview``).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

# File names are at most 255 bytes on ext4, XFS, APFS and NTFS; ours stay under 200 so that the temporary
# sibling each file is first written to (``.<name>.<random>.tmp<suffix>``) fits as well.
NAME_MAX_BYTES = 200
NAME_HASH_CHARS = 16
PROMPT_MAP = "prompts.json"


def safe_file_name(stem: str, tail: str = "") -> str:
    """``stem + tail`` as a file name: path separators become ``_``; over :data:`NAME_MAX_BYTES` bytes the stem
    keeps a readable prefix and ends with ``~`` plus the first :data:`NAME_HASH_CHARS` hex digits of its
    SHA-256, so the name is deterministic and distinct stems stay distinct: ``<prefix>~<hash><tail>``."""
    clean = stem.replace(os.sep, "_").replace("\0", "_")
    if os.altsep:
        clean = clean.replace(os.altsep, "_")
    if len((clean + tail).encode("utf-8")) <= NAME_MAX_BYTES:
        return clean + tail
    digest = "~" + hashlib.sha256(stem.encode("utf-8")).hexdigest()[:NAME_HASH_CHARS]
    budget = NAME_MAX_BYTES - len((digest + tail).encode("utf-8"))
    prefix = clean.encode("utf-8")[:budget].decode("utf-8", errors="ignore").rstrip()
    return prefix + digest + tail


def vbench_name(prompt: str, index: int, suffix: str = ".mp4") -> str:
    """VBench's file name ``<prompt>-<index>.mp4``, shortened as :func:`safe_file_name` when too long."""
    return safe_file_name(prompt, f"-{index}{suffix}")


def write_prompt_map(out_dir: Path, entries: dict[str, str]) -> Path:
    """Merge ``{file name: prompt}`` into ``out_dir/prompts.json`` (written to a temporary sibling, then renamed)."""
    path = out_dir / PROMPT_MAP
    mapping = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    mapping.update(entries)
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{PROMPT_MAP}.", suffix=".tmp", dir=out_dir)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(dict(sorted(mapping.items())), f, indent=1, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)
    return path
