"""Mutation testing of one module on a random sample of its mutants (TESTING.md).

    python tools/mutation_sample.py gpt_jax/model.py tests/test_model.py --sample 20 --seed 0

mutmut (3.8) writes every mutant of the module; this script runs the given tests, with `-x`, against
a seeded random sample of them, each in a fresh process with `MUTANT_UNDER_TEST` naming it. Every
test of the given files runs for a surviving mutant, not only those mutmut's statistics run would
pick: that selection misses tests that reuse a program another test compiled (TESTING.md).

It works in a scratch copy of the repository (`--work`, default a temporary folder), never in this
one. Before the mutants it checks that the tests pass unmutated and fail when every function of the
module raises, so a survivor means the tests ran the mutated code and did not notice. Results go to
`--out` as JSON, with each surviving mutant's diff.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def scratch_copy(work: Path) -> Path:
    """The tracked and untracked-but-not-ignored files of the repository, copied under work/mutants."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    dest = work / "mutants"
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def write_mutants(module: str, dest: Path) -> tuple[list[str], dict[str, str]]:
    """Replace dest/module with mutmut's trampolined file; returns the mutant names and their diffs."""
    import libcst as cst
    from mutmut.__main__ import write_all_mutants_to_file
    from mutmut.mutation.diff_apply import read_mutant_function, read_original_function
    from mutmut.utils.format_utils import get_mutant_name

    with open(dest / module, "w") as out:
        mutated = write_all_mutants_to_file(out=out, source=(ROOT / module).read_text(), filename=Path(module))
    names = [get_mutant_name(Path(module), name) for name in mutated.mutant_names]
    tree = cst.parse_module((dest / module).read_text())
    diffs = {}
    for name in names:
        before = tree.code_for_node(read_original_function(tree, name)).splitlines()
        after = tree.code_for_node(read_mutant_function(tree, name)).splitlines()
        diffs[name] = "\n".join(difflib.unified_diff(before, after, lineterm="", n=1))
    return names, diffs


def environment(dest: Path, work: Path) -> dict:
    """The mutated copy first on the path, skips as failures, one XLA cache (unmutated programs compile once)."""
    return {"PYTHONPATH": str(dest), "GPT_JAX_STRICT": "1", "JAX_COMPILATION_CACHE_DIR": str(work / "xla_cache"),
            "GPT_JAX_DATA": os.environ.get("GPT_JAX_DATA", str(ROOT.parent / "shared" / "data"))}


def run_tests(dest: Path, tests: list[str], mutant: str, timeout: float) -> tuple[str, float, str]:
    env = {**os.environ, "MUTANT_UNDER_TEST": mutant, **environment(dest, dest.parent)}
    start = time.time()
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                              cwd=dest, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.time() - start, ""
    outcome = {0: "survived", 1: "killed"}.get(proc.returncode, f"error {proc.returncode}")
    failed = [line for line in proc.stdout.splitlines() if line.startswith("FAILED")]
    return outcome, time.time() - start, (failed[0] if failed else proc.stdout[-300:])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("module", help="the file to mutate, e.g. gpt_jax/model.py")
    parser.add_argument("tests", nargs="+", help="test files or node ids (pytest arguments, e.g. -k EXPR)")
    parser.add_argument("--sample", type=int, default=20, help="mutants to run (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mutants", nargs="+", metavar="NAME",
                        help="run these mutants instead of a sample (e.g. the survivors of a sample, against more tests)")
    parser.add_argument("--exclude", nargs="+", type=Path, default=[], metavar="JSON",
                        help="result files of earlier passes: their mutants are not drawn again (a second sample)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per mutant before it counts as killed")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a new temporary one)")
    parser.add_argument("--out", type=Path, help="results JSON (default: <work>/result.json)")
    args = parser.parse_args(argv)
    if not (ROOT / args.module).is_file():
        parser.error(f"{args.module} is not a file of the repository")
    try:
        import mutmut  # noqa: F401
    except ImportError:
        parser.error("mutmut is not installed; pip install mutmut==3.8.1 (the version TESTING.md's figures come from)")

    seen = set()
    for path in args.exclude:
        try:
            seen |= {r["mutant"] for r in json.loads(path.read_text())["results"]}
        except (OSError, ValueError, KeyError, TypeError) as e:
            parser.error(f"--exclude {path}: not a result file of this script ({e})")
    work = (args.work or Path(tempfile.mkdtemp(prefix="gpt_jax_mutation_"))).resolve()
    if work == ROOT or ROOT in work.parents:
        parser.error(f"--work {args.work} is inside the repository; choose a folder outside it")
    out = (args.out or work / "result.json").resolve()  # before the chdir below
    if (work / "mutants").exists():
        shutil.rmtree(work / "mutants")
    work.mkdir(parents=True, exist_ok=True)
    dest = scratch_copy(work)
    os.chdir(dest)  # mutmut reads its settings from the current folder
    names, diffs = write_mutants(args.module, dest)
    if args.mutants:
        unknown = sorted(set(args.mutants) - set(names))
        if unknown:
            print(f"error: {args.module} has no mutant {unknown[0]} (names as in a result file's 'mutant')")
            return 2
        chosen = list(args.mutants)
    else:
        pool = [n for n in names if n not in seen]
        chosen = random.Random(args.seed).sample(pool, args.sample) if 0 < args.sample < len(pool) else pool
    chosen = sorted(chosen, key=lambda n: (n.rpartition("__mutmut_")[0], int(n.rpartition("_")[2])))
    print(f"{args.module}: {len(names)} mutants ({len(seen & set(names))} excluded), running {len(chosen)} against {' '.join(args.tests)} in {work}",
          flush=True)

    for check, expect in (("", "survived"), ("fail", "killed")):  # unmutated passes; every function raising fails
        outcome, seconds, detail = run_tests(dest, args.tests, check, args.timeout)
        if outcome != expect:
            print(f"set-up check failed: with MUTANT_UNDER_TEST={check!r} the tests {outcome} ({detail})")
            return 2
        print(f"check MUTANT_UNDER_TEST={check!r}: tests {'pass' if expect == 'survived' else 'fail'} "
              f"({seconds:.0f} s)", flush=True)

    results = []
    for i, name in enumerate(chosen, 1):
        outcome, seconds, detail = run_tests(dest, args.tests, name, args.timeout)
        results.append({"mutant": name, "outcome": outcome, "seconds": round(seconds, 1), "detail": detail,
                        "diff": diffs[name]})
        print(f"[{i}/{len(chosen)}] {outcome:8s} {seconds:5.0f} s  {name}", flush=True)
        if outcome != "killed":
            print(textwrap.indent(diffs[name], "    "), flush=True)

    counts = {k: sum(r["outcome"] == k for r in results) for k in ("killed", "timeout", "survived")}
    counts["error"] = len(results) - sum(counts.values())  # pytest could not run (exit code 2-5): not a kill
    summary = {"module": args.module, "tests": args.tests, "mutants": len(names), "sample": len(chosen),
               "seed": args.seed,
               "excluded": sorted(seen & set(names)), **counts, "results": results}
    out.write_text(json.dumps(summary, indent=1))
    print(f"{args.module}: {counts['killed'] + counts['timeout']} of {len(chosen)} killed "
          f"({counts['timeout']} by timeout), {counts['survived']} survived, {counts['error']} errors; {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
