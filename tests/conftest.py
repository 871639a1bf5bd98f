"""Shared test set-up.

Reference data comes from $GPT_JAX_DATA (default: ../shared/data beside the repository). Tests that
need it, or torch / transformers, skip with a reason when they are missing, except when
GPT_JAX_STRICT=1 (set by .ci/run): then every skip is a failure, so CI always runs them.
"""

import os
from pathlib import Path

import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")  # silent broadcasting bugs become errors

ROOT = Path(__file__).resolve().parents[1]
STRICT = os.environ.get("GPT_JAX_STRICT") == "1"
os.environ.setdefault("GPT_JAX_DATA", str(ROOT.parent / "shared" / "data"))
DATA = Path(os.environ["GPT_JAX_DATA"])


def data_path(*parts) -> Path:
    """A file or folder under the reference data; skips (fails under GPT_JAX_STRICT=1) if absent."""
    path = DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"reference data {path} is missing (set GPT_JAX_DATA to the shared data folder)")
    return path


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if STRICT and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped under GPT_JAX_STRICT=1, which makes skips failures: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """A module-level importorskip skips at collection; under GPT_JAX_STRICT=1 that fails too."""
    outcome = yield
    report = outcome.get_result()
    if STRICT and report.skipped:
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped under GPT_JAX_STRICT=1, which makes skips failures: {reason}"
