"""Atomic directory writes: a failure leaves the destination as it was; success replaces it whole."""

import pytest

from contentv_jax.atomic import atomic_dir


def test_atomic_dir_replaces_on_success_and_keeps_old_on_failure(tmp_path):
    dst = tmp_path / "out"
    with atomic_dir(dst) as tmp:
        (tmp / "a.txt").write_text("first")
    assert (dst / "a.txt").read_text() == "first"

    with pytest.raises(RuntimeError, match="boom"):
        with atomic_dir(dst) as tmp:
            (tmp / "a.txt").write_text("second")
            raise RuntimeError("boom")
    assert (dst / "a.txt").read_text() == "first"  # untouched

    with atomic_dir(dst) as tmp:
        (tmp / "b.txt").write_text("third")
    assert sorted(p.name for p in dst.iterdir()) == ["b.txt"]  # replaced whole, not merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary or old directory left
