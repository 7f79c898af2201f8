"""The CI rules of tests/conftest.py: under CI=true nothing skips (missing shared data, pytest.skip,
importorskip are failures naming what is missing); without CI a developer's run may skip."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROBE = '''
import pytest

def test_needs_shared_data(shared_data):
    assert (shared_data / "README.md").is_file()

def test_explicit_skip():
    pytest.skip("needs the frobnicator")
'''

PROBE_IMPORT = '''
import pytest
pytest.importorskip("contentv_no_such_module")

def test_never_runs():
    pass
'''


def _pytest(tmp_path, source: str, **env) -> subprocess.CompletedProcess:
    """Run pytest with this suite's conftest (as a plugin) on ``source``, in a fresh directory."""
    (tmp_path / "test_probe.py").write_text(source)
    full = {k: v for k, v in os.environ.items() if k not in ("CI", "CONTENTV_SHARED_DATA")}
    full |= {"PYTHONPATH": str(ROOT)} | env
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-p", "no:cacheprovider", "-rs", "test_probe.py"]
    try:
        return subprocess.run(cmd, cwd=tmp_path, env=full, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        pytest.fail("the probe pytest run did not finish within 600 s")


def test_ci_fails_naming_missing_shared_data_and_skip_reasons(tmp_path):
    res = _pytest(tmp_path, PROBE, CI="true", CONTENTV_SHARED_DATA="/nonexistent/shared/data")
    out = res.stdout + res.stderr
    assert res.returncode != 0, out
    assert "shared test data not found at /nonexistent/shared/data" in out, out
    assert "skipped under CI=true, where every test must run: Skipped: needs the frobnicator" in out, out
    assert "skipped tests: 0" in out and " skipped" not in out.split("skipped tests: 0")[-1], out


def test_ci_fails_on_importorskip(tmp_path):
    res = _pytest(tmp_path, PROBE_IMPORT, CI="true")
    out = res.stdout + res.stderr
    assert res.returncode != 0, out
    assert "contentv_no_such_module" in out and "skipped under CI=true" in out, out


def test_without_ci_the_same_run_skips_and_passes(tmp_path, shared_data):
    res = _pytest(tmp_path, PROBE, CONTENTV_SHARED_DATA="/nonexistent/shared/data")
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert "2 skipped" in out and "skipped tests: 2" in out, out
    res = _pytest(tmp_path, PROBE, CONTENTV_SHARED_DATA=str(shared_data))  # the data found through the variable
    assert "1 passed, 1 skipped" in res.stdout, res.stdout
