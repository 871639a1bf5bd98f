"""Every number a command takes on its command line is checked by the parser, below and above: an absurd value
(huge, negative, NaN, infinite, not a number) is one `error:` line naming the flag, exit code 2, and nothing
is read or compiled. The flags' bounds are stated here, apart from the commands that set them."""

import importlib
import importlib.util

import jax
import pytest

from conftest import ROOT

ABSURD = ["1099511627776", "-1", "nan", "inf", "many"]

# (command, the arguments before the flag, the flag, its kind and range, more absurd values for it)
FLAGS = [
    ("sample", ["--checkpoint", "r"], "--max-new-tokens", int, "[1, 1000000]", ["0", "1000001"]),
    ("sample", ["--checkpoint", "r"], "--temperature", float, "[0, 100]", ["-0.1", "100.5", "1e400"]),
    ("sample", ["--checkpoint", "r"], "--top-k", int, "[0, 1000000]", ["1.5"]),
    ("sample", ["--checkpoint", "r"], "--top-p", float, "(0, 1]", ["0", "1.01"]),
    ("sample", ["--checkpoint", "r"], "--num-samples", int, "[1, 10000]", ["0"]),
    ("sample", ["--checkpoint", "r"], "--seed", int, "[0, 2147483647]", ["2147483648"]),
    ("predict", ["--checkpoint", "r", "--input", "x"], "--batch-size", int, "[1, 65536]", ["0"]),
    ("evaluate", ["--checkpoint", "r"], "--step", int, "[0, 2147483647]", ["2147483648"]),
    ("evaluate", ["--checkpoint", "r", "perplexity", "--input", "x"], "--stride", int, "[1, 1000000]", ["0"]),
    ("evaluate", ["--checkpoint", "r", "benchmark", "ptb"], "--stride", int, "[1, 1000000]", ["0"]),
    ("bench", ["--config", "c"], "--steps", int, "[1, 100000]", ["0"]),
    ("bench", ["--config", "c"], "--gen-batch", int, "[1, 4096]", ["0"]),
    ("bench", ["--config", "c"], "--gen-prompt", int, "[1, 1000000]", ["0"]),
    ("bench", ["--config", "c"], "--gen-new", int, "[1, 1000000]", ["0"]),
    ("bench", ["--config", "c"], "--scan-table", int, "[1, 1000]", ["0"]),
    ("data", ["corpus.txt"], "--val-fraction", float, "(0, 1)", ["0", "1"]),
    ("data", ["corpus.txt"], "--num-proc", int, "[1, 1024]", ["0", "1025"]),
]
CASES = [pytest.param(command, [*before, flag, value], kind, bound, id=f"{command} {flag} {value}")
         for command, before, flag, kind, bound, extra in FLAGS for value in ABSURD + extra]


def one_usage_error(capsys, main, argv) -> str:
    """Run a command's main on argv; it must exit 2 with one `error:` line on stderr, compiling nothing."""
    compiled = []

    def listen(event, _seconds, **_):
        if event.startswith("/jax/core/compile"):
            compiled.append(event)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        with pytest.raises(SystemExit) as exit_:
            main(argv)
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert exit_.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert not out and not compiled, (out, compiled)
    return lines[0]


@pytest.mark.parametrize("command, argv, kind, bound", CASES)
def test_absurd_numbers_are_one_line_and_exit_2_before_anything_runs(capsys, command, argv, kind, bound):
    flag, value = argv[-2:]
    try:
        kind(value)
        why = f"must be in {bound}, got {value}"
    except ValueError:
        why = f"expected {'an integer' if kind is int else 'a number'}, got {value!r}"
    line = one_usage_error(capsys, importlib.import_module(f"gpt_jax.{command}").main, argv)
    assert line == f"error: argument {flag}: {why} (see --help)"


def test_train_py_s_own_flags_follow_the_convention(capsys):
    """train.py's numbers are config settings (checked against config.RANGES); its own flags are not numbers,
    but a wrong one is the same one line."""
    spec = importlib.util.spec_from_file_location("train_script", ROOT / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    assert one_usage_error(capsys, train.main, ["--steps", "5"]) == "error: unrecognized arguments: --steps (see --help)"
    assert "argument --config: expected one argument" in one_usage_error(capsys, train.main, ["--config"])


def test_the_values_at_each_bound_are_accepted():
    from gpt_jax.errors import number

    assert number("[1, 1000000]")("1000000") == 1000000 and number("[0, 100]", float)("0") == 0.0
    assert number("(0, 1]", float)("1") == 1.0 and number("(0, 1)", float)("1e-9") == 1e-9
