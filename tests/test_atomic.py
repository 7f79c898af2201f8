"""Atomic directory writes: a failure leaves the destination as it was; success replaces it whole."""

import pytest

from contentv_jax.atomic import atomic_dir, atomic_file


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


def test_atomic_file_replaces_on_success_and_keeps_old_on_failure(tmp_path):
    dst = tmp_path / "sub" / "a.json"
    with atomic_file(dst) as tmp:
        assert tmp.parent == dst.parent and tmp.suffix == ".json" and not tmp.exists()
        tmp.write_text("one")
    assert dst.read_text() == "one"
    with pytest.raises(RuntimeError):
        with atomic_file(dst) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert dst.read_text() == "one"
    assert sorted(p.name for p in dst.parent.iterdir()) == ["a.json"]  # no temporary left behind
    with atomic_file(dst, suffix=".npy") as tmp:
        assert tmp.name.endswith(".npy")
        tmp.write_text("two")
    assert dst.read_text() == "two"
