"""bench/timing.py: the side-by-side timer's call order and its errors (no timing is asserted)."""

import pytest

from bench.timing import interleaved, medians


def test_interleaved_settles_each_timed_call_and_alternates_sides():
    calls = []
    fns = {"torch": lambda: calls.append("torch"), "jax": lambda: calls.append("jax")}
    times = interleaved(fns, repeats=3, settle=1)
    # per round: torch settle, torch timed, jax settle, jax timed
    assert calls == ["torch", "torch", "jax", "jax"] * 3
    assert {k: len(v) for k, v in times.items()} == {"torch": 3, "jax": 3}
    assert all(t >= 0 for v in times.values() for t in v)
    calls.clear()
    assert set(medians(fns, repeats=2, settle=0)) == {"torch", "jax"}
    assert calls == ["torch", "jax"] * 2


@pytest.mark.parametrize("kwargs, match", [({"repeats": 0}, "repeats must be >= 1"), ({"repeats": 1, "settle": -1}, "settle must be >= 0")])
def test_interleaved_rejects_bad_counts(kwargs, match):
    with pytest.raises(ValueError, match=match):
        interleaved({"a": lambda: None}, **kwargs)
