"""A whole mutation pass over the core modules, each mutant against the tests that reach it (TESTING.md).

    python tools/mutation_pass.py --work /tmp/gpt_jax_mutation --jobs 2          # run, or go on
    python tools/mutation_pass.py --work /tmp/gpt_jax_mutation --report          # the table so far

mutmut (3.8) writes every mutant of each module into a scratch copy of the repository. Then:

1. Statistics: every test file runs once, unmutated, with `MUTANT_UNDER_TEST=stats`; each function's
   trampoline records the test that called it, in the test process and in every process the test
   starts (`train.py`, `gpt_jax.sample`, a second host). `tests/conftest.py` forgets compiled
   programs before each test, so a jitted function is recorded for every test that traces it, not
   only the first. A test that fails here is left out of every selection (and named); each test's
   time is kept.
2. Mutants: each runs, with `-x`, the tests that reached its function, fastest first and as many as
   fit in `--max-seconds` of their statistics-run time (the rest are counted as left out), in a process
   forked from one that has imported JAX, Flax, torch and pytest but started no XLA runtime (so the
   fork is safe and a mutant costs its tests, not the imports). A mutant no test reaches is reported
   as such; one that runs past 3x its tests' time plus a minute counts as killed by timeout.

Results go to `<work>/results.jsonl` as each mutant finishes, with its diff and the failing test, so
a pass that is stopped goes on where it left off. The scratch copy (and with it the tests the pass
runs) is kept while the mutated modules' text is what it was made from; otherwise the tool stops,
and `--fresh` starts the pass again there (`--results-from` then keeps what still applies).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mutation_sample import ROOT, environment, scratch_copy, write_mutants  # noqa: E402

CORE = ["optim", "model", "data", "generate", "checkpoint", "parallel", "finetune", "trainer", "loop"]
HOOK = "from mutmut.mutation.trampoline import wrap_in_trampoline as _mutmut_mutated, MutantDict"

# Imported by each mutated module: under the statistics run it records (test, function) pairs to a
# file shared by every process the tests start; the current test's id travels in the environment.
HITS_MODULE = '''"""Written by tools/mutation_pass.py: records which test reaches which mutated function."""
import os

import mutmut.mutation.trampoline as _trampoline

_seen = set()


def _record(name, caller=None):
    key = (os.environ.get("GPT_JAX_MUTATION_TEST", "<collection>"), name)
    if key not in _seen:
        _seen.add(key)
        with open(os.environ["GPT_JAX_MUTATION_HITS"], "a", encoding="utf-8") as f:
            f.write(key[0] + "\\t" + name + "\\n")


if os.environ.get("GPT_JAX_MUTATION_HITS"):
    _trampoline.record_trampoline_hit = _record
'''

PLUGIN_MODULE = '''"""Written by tools/mutation_pass.py: the current test's id in the environment, and test times."""
import json
import os


def pytest_runtest_logstart(nodeid, location):
    os.environ["GPT_JAX_MUTATION_TEST"] = nodeid


def pytest_runtest_logreport(report):
    if os.environ.get("GPT_JAX_MUTATION_TIMES"):
        with open(os.environ["GPT_JAX_MUTATION_TIMES"], "a") as f:
            f.write(json.dumps([report.nodeid, report.when, report.outcome, report.duration]) + "\\n")
'''


def fingerprint(modules: list[str]) -> str:
    """The mutated modules' text: the mutants and their names follow from it."""
    h = hashlib.sha256()
    for m in sorted(modules):
        h.update(m.encode() + b"\0" + (ROOT / m).read_bytes())
    return h.hexdigest()[:16]


def prepare(work: Path, modules: list[str], tests: list[str], fresh: bool = False, readonly: bool = False) -> dict:
    """The scratch copy with every module's mutants written in; reused while the sources are unchanged."""
    meta_path = work / "mutants.json"
    fp = fingerprint(modules)
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if readonly or (meta["fingerprint"] == fp and sorted(meta["modules"]) == sorted(modules)):
            if meta["fingerprint"] != fp:
                print("note: the mutated modules have changed since this pass was made")
            return meta
        if not fresh:
            sys.exit(f"{work} holds a pass over other modules or other source text ({', '.join(meta['modules'])}): "
                     "give another --work, or --fresh to start this one again (its results are deleted)")
        for name in ("results.jsonl", "hits.tsv", "times.jsonl", "stats.json"):
            (work / name).unlink(missing_ok=True)
    elif readonly:
        sys.exit(f"{work} holds no mutation pass")
    work.mkdir(parents=True, exist_ok=True)
    dest = scratch_copy(work)
    cwd = os.getcwd()
    os.chdir(dest)  # mutmut reads its settings from the current folder
    try:
        mutants = {}
        for module in modules:
            names, diffs = write_mutants(module, dest)
            text = (dest / module).read_text()
            assert HOOK in text, f"mutmut's trampoline import not found in {module}"
            (dest / module).write_text(text.replace(HOOK, HOOK + "\nimport _gpt_jax_mutation_hits  # noqa", 1))
            mutants[module] = {name: diffs[name] for name in names}
    finally:
        os.chdir(cwd)
    (dest / "_gpt_jax_mutation_hits.py").write_text(HITS_MODULE)
    (dest / "_gpt_jax_mutation_plugin.py").write_text(PLUGIN_MODULE)
    meta = {"fingerprint": fp, "modules": modules, "tests": tests, "dest": str(dest), "mutants": mutants}
    meta_path.write_text(json.dumps(meta))
    return meta


def test_files(tests: list[str]) -> list[str]:
    out = []
    for t in tests:
        p = ROOT / t
        out += [t] if p.is_file() else sorted(str(f.relative_to(ROOT)) for f in p.rglob("test_*.py"))
    return out


def statistics(work: Path, dest: Path, tests: list[str], jobs: int) -> dict:
    """{function: [test ids]} and {test id: seconds}, from one unmutated run of every test file."""
    stats_path = work / "stats.json"
    if stats_path.exists():
        return json.loads(stats_path.read_text())
    hits, times = work / "hits.tsv", work / "times.jsonl"
    hits.unlink(missing_ok=True)
    times.unlink(missing_ok=True)
    env = {**os.environ, **environment(dest, work), "MUTANT_UNDER_TEST": "stats",
           "GPT_JAX_MUTATION_HITS": str(hits), "GPT_JAX_MUTATION_TIMES": str(times)}
    files = sorted(test_files(tests), key=lambda f: -(ROOT / f).stat().st_size)  # big files first
    running, failed = {}, []
    start = time.time()
    while files or running:
        while files and len(running) < jobs:
            f = files.pop(0)
            log = open(work / "logs" / ("stats_" + Path(f).stem + ".log"), "w")
            running[f] = (subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                            "-p", "_gpt_jax_mutation_plugin", f], cwd=dest, env=env,
                                           stdout=log, stderr=subprocess.STDOUT), log)
        time.sleep(0.5)
        for f, (proc, log) in list(running.items()):
            if proc.poll() is not None:
                log.close()
                del running[f]
                print(f"  statistics: {f} rc {proc.returncode} ({time.time() - start:.0f} s so far)", flush=True)
                if proc.returncode != 0:
                    failed.append(f)
    reached = collections.defaultdict(set)
    for line in hits.read_text().splitlines():
        test, _, function = line.partition("\t")
        reached[function].add(test)
    seconds, failing = collections.defaultdict(float), set()
    for line in times.read_text().splitlines():
        nodeid, _when, outcome, duration = json.loads(line)
        seconds[nodeid] += duration
        if outcome == "failed":
            failing.add(nodeid)
    if failing:  # a mutant cannot be judged by a test that fails unmutated: left out, and said
        print(f"  {len(failing)} tests fail unmutated and are left out: {sorted(failing)} (logs in {work / 'logs'})")
    for tests in reached.values():
        tests -= failing
    stats = {"reached": {k: sorted(v) for k, v in reached.items()},
             "seconds": {k: v for k, v in seconds.items() if k not in failing}, "failing": sorted(failing),
             "files_failing": failed, "wall": round(time.time() - start)}
    stats_path.write_text(json.dumps(stats))
    return stats


def selection(function: str, stats: dict, max_seconds: float) -> tuple[list[str], int]:
    """The tests that reach the function, fastest first, as many as fit in max_seconds of their
    statistics-run time (at least one); and how many were left out for that."""
    tests = set(stats["reached"].get(function, []))
    if "<collection>" in tests:  # reached while importing: every test depends on it
        tests = set(stats["seconds"])
    tests = sorted((t for t in tests if t in stats["seconds"]), key=lambda t: (stats["seconds"][t], t))
    total, kept = 0.0, []
    for t in tests:
        total += stats["seconds"][t]
        if kept and total > max_seconds:
            break
        kept.append(t)
    return kept, len(tests) - len(kept)


def child(dest: Path, mutant: str, tests: list[str], log: Path) -> None:
    """In the forked process: run the tests against one mutant and exit with pytest's status."""
    try:
        os.setpgrp()
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.environ["MUTANT_UNDER_TEST"] = mutant
        import pytest

        rc = pytest.main(["-x", "-q", "-rf", "-p", "no:cacheprovider", *tests])
    except BaseException:  # noqa: BLE001 - whatever happens here is an error, never a kill
        import traceback

        traceback.print_exc()
        rc = 99
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(rc))


def warm_up() -> None:
    """What every test needs imported, without starting XLA: forks of this process are then safe."""
    import flax.linen  # noqa: F401
    import jax  # noqa: F401
    import numpy  # noqa: F401
    import optax  # noqa: F401
    import orbax.checkpoint  # noqa: F401
    import pytest  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers import GPT2LMHeadModel, OpenAIGPTLMHeadModel  # noqa: F401

    import jax._src.xla_bridge as xb
    assert not xb._backends, "an XLA backend started before the fork"


def run_mutants(work: Path, meta: dict, stats: dict, jobs: int, only: list[str] | None, budget: float,
                max_seconds: float) -> None:
    dest = Path(meta["dest"])
    results_path = work / "results.jsonl"
    done = set()
    if results_path.exists():
        done = {json.loads(line)["mutant"] for line in results_path.read_text().splitlines()}
    queue = [(m, name) for m in meta["modules"] for name in meta["mutants"][m]
             if name not in done and (not only or any(name.startswith(o) or o in name for o in only))]
    print(f"{len(done)} mutants done, {len(queue)} to run, {jobs} at a time", flush=True)
    os.environ.update(environment(dest, work))
    os.environ["MUTANT_UNDER_TEST"] = ""
    os.environ.pop("GPT_JAX_MUTATION_HITS", None)
    os.chdir(dest)
    sys.path.insert(0, str(dest))
    warm_up()
    (work / "logs").mkdir(exist_ok=True)
    running = {}  # pid -> (module, mutant, tests, start, limit)
    start = time.time()
    finished = 0

    total = len(queue)

    def record(module, mutant, tests, left_out, outcome, seconds, detail):
        nonlocal finished
        finished += 1
        entry = {"module": module, "mutant": mutant, "outcome": outcome, "seconds": round(seconds, 1),
                 "tests": len(tests), "left_out": left_out, "detail": detail, "diff": meta["mutants"][module][mutant]}
        with open(results_path, "a") as f:
            f.write(json.dumps(entry) + "\n")
        print(f"[{finished}/{total}] {outcome:9s} {seconds:5.0f} s {len(tests):3d} tests (+{left_out})  {mutant}",
              flush=True)

    while queue or running:
        while queue and len(running) < jobs and time.time() - start < budget:
            module, mutant = queue.pop(0)
            tests, left_out = selection(mutant.rpartition("__mutmut_")[0], stats, max_seconds)
            if not tests:
                record(module, mutant, tests, 0, "no tests", 0.0, "no test reaches this function")
                continue
            limit = 60 + 3 * sum(stats["seconds"].get(t, 60) for t in tests)
            pid = os.fork()
            if pid == 0:
                child(dest, mutant, tests, work / "logs" / f"{mutant}.log")
            running[pid] = (module, mutant, tests, left_out, time.time(), limit)
        if not running:
            break
        time.sleep(0.2)
        for pid, (module, mutant, tests, left_out, t0, limit) in list(running.items()):
            got, status = os.waitpid(pid, os.WNOHANG)
            if got == 0:
                if time.time() - t0 > limit:
                    os.killpg(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    del running[pid]
                    record(module, mutant, tests, left_out, "timeout", time.time() - t0, f"over {limit:.0f} s")
                continue
            del running[pid]
            try:
                os.killpg(pid, signal.SIGKILL)  # whatever the tests started and left behind
            except ProcessLookupError:
                pass
            log = work / "logs" / f"{mutant}.log"
            text = log.read_text(errors="replace") if log.exists() else ""
            if os.WIFSIGNALED(status):
                outcome, detail = "killed", f"crashed with signal {os.WTERMSIG(status)}"
            else:
                rc = os.WEXITSTATUS(status)
                outcome = {0: "survived", 1: "killed"}.get(rc, f"error {rc}")
                failed = [line for line in text.splitlines() if line.startswith("FAILED")]
                detail = failed[0][:300] if failed else text[-300:]
            if outcome in ("killed", "survived"):
                log.unlink(missing_ok=True)  # keep the logs of errors only
            record(module, mutant, tests, left_out, outcome, time.time() - t0, detail)
    left = len(queue)
    print(f"stopped after {time.time() - start:.0f} s; {left} not run (run again to go on)" if left else
          f"all run in {time.time() - start:.0f} s", flush=True)


def take_results(work: Path, meta: dict, source: Path) -> None:
    """Results of an earlier pass (a committed copy, say) for mutants that are still the same change:
    the same name and the same diff. The others run again."""
    results_path = work / "results.jsonl"
    done = set()
    if results_path.exists():
        done = {json.loads(line)["mutant"] for line in results_path.read_text().splitlines()}
    taken = stale = 0
    with open(results_path, "a") as out:
        for line in source.read_text().splitlines():
            r = json.loads(line)
            if r["mutant"] in done:
                continue
            if meta["mutants"].get(r["module"], {}).get(r["mutant"]) == r["diff"]:
                out.write(line + "\n")
                taken += 1
            else:
                stale += 1
    print(f"{source}: {taken} results taken, {stale} for mutants that changed or are not in this pass")


def save_results(work: Path, dest: Path) -> None:
    """Merge this pass's results into `dest` (the committed copy): a mutant in both takes this pass's
    result, the others keep theirs, so a pass over some modules leaves the other modules' results alone."""
    mine = {}
    for line in (work / "results.jsonl").read_text().splitlines():
        mine[json.loads(line)["mutant"]] = line
    lines = dest.read_text().splitlines() if dest.exists() else []
    kept = [mine.pop(json.loads(line)["mutant"], line) for line in lines]
    dest.write_text("\n".join(kept + list(mine.values())) + "\n")
    print(f"{dest}: {len(kept)} results kept or replaced, {len(mine)} added")


VERDICTS = ROOT / "tools" / "mutation_verdicts.tsv"


def verdicts(path: Path = VERDICTS) -> dict[str, tuple[str, str]]:
    """mutant -> (verdict, why): how each survivor of a pass was sorted. killed: by a test added or
    named since (checked with tools/mutation_sample.py --mutants); equivalent: no input tells it apart;
    harmless: it changes only a display detail or the time taken; real: a gap no test closes yet."""
    out = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip() and not line.startswith("#"):
                mutant, verdict, why = line.split("\t", 2)
                assert verdict in ("killed", "equivalent", "harmless", "real"), f"{path}: unknown verdict {verdict!r}"
                out[mutant] = (verdict, why)
    return out


def report(work: Path, meta: dict) -> dict:
    """Per module: the pass's counts, the survivors as sorted in VERDICTS, and the score: mutants killed
    (in the pass, or by a test added for a survivor) over those run less the equivalent ones."""
    rows = {}
    results = [json.loads(line) for line in (work / "results.jsonl").read_text().splitlines()] \
        if (work / "results.jsonl").exists() else []
    sorted_ = verdicts()
    print(f"{'module':22s} {'mutants':>7s} {'run':>5s} {'killed':>6s} {'left':>5s} | {'killed':>6s} {'equiv':>5s} "
          f"{'harml':>5s} {'real':>5s} {'open':>5s} | score")
    for module in meta["modules"]:
        mine = [r for r in results if r["module"] == module]
        c = collections.Counter(r["outcome"] if not r["outcome"].startswith("error") else "error" for r in mine)
        killed = c["killed"] + c["timeout"]
        left = [r["mutant"] for r in mine if r["outcome"] not in ("killed", "timeout")]
        v = collections.Counter(sorted_.get(m, ("open",))[0] for m in left)
        denominator = len(mine) - v["equivalent"]
        score = f"{(killed + v['killed']) / denominator:.1%}" if denominator else "-"
        rows[module] = {"mutants": len(meta["mutants"][module]), "run": len(mine), "killed_in_pass": killed,
                        "timeouts": c["timeout"], "not_killed": len(left), "errors": c["error"],
                        "no_tests": c["no tests"], **{f"sorted_{k}": n for k, n in v.items()}, "score": score}
        print(f"{module:22s} {len(meta['mutants'][module]):7d} {len(mine):5d} {killed:6d} {len(left):5d} | "
              f"{v['killed']:6d} {v['equivalent']:5d} {v['harmless']:5d} {v['real']:5d} {v['open']:5d} | {score}")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modules", nargs="+", default=[f"gpt_jax/{m}.py" for m in CORE])
    parser.add_argument("--tests", nargs="+", default=["tests"], help="test files or folders")
    parser.add_argument("--work", type=Path, required=True, help="scratch folder, outside the repository")
    parser.add_argument("--jobs", type=int, default=2, help="mutants (and test files, for the statistics) at once")
    parser.add_argument("--only", nargs="+", help="run only mutants whose name starts with or contains these")
    parser.add_argument("--max-seconds", type=float, default=120,
                        help="a mutant runs the fastest tests that reach it up to this much statistics-run time")
    parser.add_argument("--budget", type=float, default=float("inf"), help="start no mutant after this many seconds")
    parser.add_argument("--results-from", type=Path, metavar="JSONL",
                        help="take an earlier pass's results for the mutants that are still the same change")
    parser.add_argument("--fresh", action="store_true", help="start again in a --work that holds another pass")
    parser.add_argument("--report", action="store_true", help="print the counts so far and stop")
    parser.add_argument("--save", type=Path, metavar="JSONL",
                        help="merge this pass's results into JSONL (e.g. tools/mutation_results.jsonl) and stop")
    parser.add_argument("--show", nargs="*", metavar="MODULE",
                        help="print every mutant not killed so far (of these modules), with its diff, and stop")
    args = parser.parse_args(argv)
    for m in args.modules:
        if not (ROOT / m).is_file():
            parser.error(f"{m} is not a file of the repository")
    work = args.work.resolve()
    if work == ROOT or ROOT in work.parents:
        parser.error(f"--work {args.work} is inside the repository; choose a folder outside it")
    try:
        import mutmut  # noqa: F401
    except ImportError:
        parser.error("mutmut is not installed; pip install mutmut==3.8.1")
    meta = prepare(work, args.modules, args.tests, fresh=args.fresh,
                   readonly=args.report or args.show is not None or args.save is not None)
    if args.save:
        save_results(work, args.save)
        return 0
    if args.report:
        report(work, meta)
        return 0
    if args.show is not None:
        for line in (work / "results.jsonl").read_text().splitlines():
            r = json.loads(line)
            if r["outcome"] not in ("killed", "timeout") and (not args.show or r["module"] in args.show):
                print(f"{r['mutant']}: {r['outcome']} ({r['tests']} tests, {r['left_out']} left out)\n{r['diff']}\n")
        return 0
    meta["modules"] = args.modules  # the order to run them in
    if args.results_from:
        take_results(work, meta, args.results_from)
    (work / "logs").mkdir(exist_ok=True)
    stats = statistics(work, Path(meta["dest"]), args.tests, args.jobs)
    print(f"statistics: {len(stats['seconds'])} tests, {len(stats['reached'])} functions reached "
          f"({stats['wall']} s)", flush=True)
    run_mutants(work, meta, stats, args.jobs, args.only, args.budget, args.max_seconds)
    report(work, meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
