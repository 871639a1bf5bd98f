"""Shared test set-up.

Reference data comes from $GPT_JAX_DATA (default: ../shared/data beside the repository). Tests that
need it, or torch / transformers, skip with a reason when they are missing, except when
GPT_JAX_STRICT=1 (set by .ci/run): then every skip is a failure, so CI always runs them.
"""

import atexit
import contextlib
import os
import shutil
import tempfile
from pathlib import Path

# The suite runs on the CPU. The TPU and GPU compilers the test extras install (tests/test_compile.py) would
# otherwise be started as backends of their own, looking for hardware that is not there; this process and
# every process a test starts keep to the CPU, and compile for those targets from their topologies alone.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")  # silent broadcasting bugs become errors

# One XLA compilation cache for the session, shared with the train.py processes tests start: many
# tests compile the same tiny model's programs, several times over in subprocesses. A cached program
# is the one XLA compiled, so results are unchanged. JAX_COMPILATION_CACHE_DIR set outside wins.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="gpt_jax_tests_xla_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
jax.config.update("jax_persistent_cache_min_entry_size_bytes",
                  int(os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"]))

ROOT = Path(__file__).resolve().parents[1]

# For the subprocesses of tests that check orchestration across devices and processes (strategies, sharding,
# multi-host runs, checkpoints moved between them): each compares runs compiled alike with one another, so XLA's
# backend optimisations only cost them compile time, about a third of their CPU time on a 2-core machine.
# Model numerics, reference parity, memory figures and the bitwise SIGKILL tests compile as a user's run does.
ORCHESTRATION_ENV = {"JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}


@contextlib.contextmanager
def compiled_alike():
    """In-process tests that compare runs of this code with one another (the training loop's resume, prefetch,
    steps per call and logging; scanned against unrolled layers; a padded vocabulary) compile without XLA's
    backend optimisations, as the orchestration subprocesses do: both sides of each comparison compile alike,
    and the optimisations are a quarter to two fifths of such a test's CPU time. The programs compiled here are dropped at
    the end, so no later test runs one. Parity with transformers, numerics against
    formulas, memory figures and the bitwise SIGKILL/SIGTERM runs compile as a user's run does."""
    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", before)
        from gpt_jax import clear_decode_cache

        jax.clear_caches()  # no later test runs a program compiled here
        clear_decode_cache()


@pytest.fixture
def unoptimized():
    """compiled_alike() for one test."""
    with compiled_alike():
        yield


def orchestration_env(devices: int) -> dict:
    """The environment of such a subprocess: `devices` fake CPU devices, backend optimisations off."""
    return {**os.environ, **ORCHESTRATION_ENV, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
            "JAX_PLATFORMS": "cpu"}
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


@pytest.fixture(autouse=True)
def _trace_again_for_mutation_stats():
    """Under mutmut's statistics run, forget compiled programs before each test.

    mutmut runs, for each mutant, only the tests that called the mutated function in that run. A
    jitted function's Python body runs only when it is traced, so without this only the first test
    to compile a program would be recorded as reaching the functions inside it (TESTING.md).
    """
    if os.environ.get("MUTANT_UNDER_TEST") == "stats":
        from gpt_jax import clear_decode_cache

        jax.clear_caches()
        clear_decode_cache()
    yield
