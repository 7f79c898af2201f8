"""Test setup: 8 simulated CPU devices (set before JAX is imported), the shared data fixture, and CI rules.

Environment:
  ``CONTENTV_SHARED_DATA``: the real test data directory (default ``../shared/data`` beside the checkout).
  ``CI=true`` (as ``.ci/run`` and CI services set it): nothing may skip. A skip of any kind (missing shared
  data, a ``pytest.skip`` / ``importorskip`` / ``skipif``) is reported as a failure naming what was missing,
  and the session fails if any test was skipped.
"""

import os
from pathlib import Path

_DEVICES_FLAG = "--xla_force_host_platform_device_count"
# LLVM's optimisation level for XLA:CPU code. The suite's models are tiny, so compiling them costs more than
# running them, and most of a compile is LLVM's optimisation passes: level 0 cut the RLHF gradient tests'
# compiles by a third and left a real-width VAE test's run time unchanged (both measured on 2 cores). XLA's
# own HLO passes (fusion, layout, sharding) still run, so the programs tested are the ones users run.
OPT_LEVEL_FLAG = "--xla_backend_optimization_level=0"
_flags = os.environ.get("XLA_FLAGS", "")
if _DEVICES_FLAG not in _flags:  # keep a caller's other XLA flags; the suite needs its 8 CPU devices
    _flags = f"{_flags} {_DEVICES_FLAG}=8"
if "--xla_backend_optimization_level" not in _flags:
    _flags = f"{_flags} {OPT_LEVEL_FLAG}"
os.environ["XLA_FLAGS"] = _flags.strip()
# JAX's persistent compilation cache, shared by the tests and the CLIs they start (inherited through the
# environment): the suite compiles the same tiny train step, sampler and VAE in many processes, and on 2 CPU
# cores XLA's compiles are most of its time. A fresh clone starts it empty (it lives in .pytest_cache/).
# Its key is the program, the compile options and the jax/jaxlib versions, so a changed model is a miss.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".pytest_cache" / "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import pytest  # noqa: E402

CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
SHARED_DATA = Path(os.environ.get("CONTENTV_SHARED_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real test data (``CONTENTV_SHARED_DATA`` or ``../shared/data`` beside the checkout; tests only).

    Missing: a failure under ``CI=true``, a skip otherwise (a developer's checkout without the data)."""
    if not (SHARED_DATA / "README.md").is_file():
        msg = (f"shared test data not found at {SHARED_DATA} (expected its README.md; place ../shared/data beside "
               "the checkout or set CONTENTV_SHARED_DATA)")
        if CI:
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)
    return SHARED_DATA


def _fail_skip(report) -> None:
    """Under CI a skipped report becomes a failure that names the skip's reason (the missing thing)."""
    if CI and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, where every test must run: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_skip(outcome.get_result())


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    skipped = len(terminalreporter.stats.get("skipped", []))
    terminalreporter.write_line(f"skipped tests: {skipped}")
    if CI and skipped:
        terminalreporter.write_line(f"CI=true: {skipped} skipped tests (must be 0)", red=True)


def pytest_sessionfinish(session, exitstatus):
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if CI and reporter is not None and reporter.stats.get("skipped") and session.exitstatus == 0:
        session.exitstatus = 1
