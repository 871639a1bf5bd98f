"""The training loop (gpt_jax/loop.py), in process on tiny models: prefetching and several steps per
dispatch change nothing, metrics are read a step behind, the multi-host stop check runs only every
log interval, evaluation reads the device once, and the fine-tuning task resumes its data order."""

import json

import jax
import numpy as np
import pytest

from gpt_jax import loop
from gpt_jax.config import load_config

LM = ["model.preset=gpt2-tiny", "model.n_layer=2", "model.n_embd=32", "model.n_head=2", "model.n_positions=16",
      "train.batch_size=8", "train.eval_batches=2", "train.log_every=1", "train.sample_tokens=0", "optim.lr=3e-3",
      "optim.warmup_steps=2"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("loop")
    rng = np.random.default_rng(0)
    (tmp / "corpus.txt").write_text("".join(rng.choice(list("abcd \n"), 20_000)))

    def rows(n):
        lines = ["sentence\tlabel"]
        for _ in range(n):
            s = "".join(rng.choice(list("ab "), rng.integers(4, 12)))
            lines.append(f"{s}\t{int(s.count('a') > s.count('b'))}")
        return "\n".join(lines) + "\n"

    (tmp / "train.tsv").write_text(rows(44))  # 6 batches of 8, the last one padded
    (tmp / "dev.tsv").write_text(rows(20))
    return tmp


def lm_config(corpus, out, *extra):
    return load_config(None, LM + [f"data.source={corpus / 'corpus.txt'}", f"data.cache_dir={corpus / 'cache'}",
                                   f"train.out_dir={out}", *extra])


def ft_config(corpus, out, *extra):
    return load_config(None, [
        "mode=finetune", "model.preset=gpt1-tiny", "model.n_layer=2", "model.n_embd=32", "model.n_head=2",
        "model.n_positions=16", f"data.source={corpus / 'corpus.txt'}", f"data.cache_dir={corpus / 'cache'}",
        f"finetune.train_file={corpus / 'train.tsv'}", f"finetune.dev_file={corpus / 'dev.tsv'}",
        "finetune.batch_size=8", "finetune.epochs=2", "finetune.lr=1e-3", "train.log_every=1",
        f"train.out_dir={out}", *extra])


def records(run_dir, kind="train"):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def run_task(config, loop_cls=loop.Loop, **attrs):
    from gpt_jax.finetune import FinetuneTask
    from gpt_jax.trainer import PretrainTask

    task = (FinetuneTask if config.mode == "finetune" else PretrainTask)(config, verbose=False)
    lp = loop_cls(task, verbose=False)
    for k, v in attrs.items():
        setattr(lp, k, v)
    return lp.run()


def test_prefetch_and_steps_per_call_give_the_same_run(corpus, tmp_path):
    args = ("train.steps=9", "train.eval_every=5", "train.save_every=5")
    ref = run_task(lm_config(corpus, tmp_path / "ref", "data.prefetch=0", *args))
    for name, extra in {"prefetch": ["data.prefetch=2"], "scan": ["data.prefetch=2", "train.steps_per_call=3"]}.items():
        got = run_task(lm_config(corpus, tmp_path / name, *extra, *args))
        np.testing.assert_allclose([r["loss"] for r in records(tmp_path / name)],
                                   [r["loss"] for r in records(tmp_path / "ref")], rtol=1e-6, err_msg=name)
        assert [r["step"] for r in records(tmp_path / name, "eval")] == [5, 9]
        for a, b in zip(jax.tree.leaves(got["params"]), jax.tree.leaves(ref["params"])):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7, err_msg=name)
    assert sorted(int(p.name) for p in (tmp_path / "scan" / "checkpoints").iterdir() if p.name.isdigit()) == [5, 9]


def test_evaluation_is_one_device_read_of_the_mean_loss(corpus, tmp_path, monkeypatch):
    from gpt_jax.data import eval_batches, prepare
    from gpt_jax.trainer import make_eval_step

    reads = []
    real_evaluate = loop.Loop._evaluate

    def counting_evaluate(self, step):
        reads.append(0)
        get = jax.device_get
        monkeypatch.setattr(jax, "device_get", lambda x: (reads.__setitem__(-1, reads[-1] + 1), get(x))[1])
        try:
            return real_evaluate(self, step)
        finally:
            monkeypatch.setattr(jax, "device_get", get)

    monkeypatch.setattr(loop.Loop, "_evaluate", counting_evaluate)
    config = lm_config(corpus, tmp_path / "run", "train.steps=4", "train.eval_every=4", "train.eval_batches=3")
    result = run_task(config)
    assert reads == [1]
    data = prepare(config.data, verbose=False)
    step = jax.jit(make_eval_step(result["config"]))
    direct = np.mean([float(step(result["params"], b)) for b in eval_batches(data.tokens("val"), 16, 8, 3)])
    np.testing.assert_allclose(records(tmp_path / "run", "eval")[0]["val_loss"], direct, rtol=1e-5)


def test_multi_host_stop_check_runs_every_log_interval(corpus, tmp_path, monkeypatch):
    calls, stop_at = [], [3]  # as if another process had received SIGTERM by the third check
    monkeypatch.setattr(loop, "any_process", lambda flag: calls.append(flag) or len(calls) in stop_at)
    config = lm_config(corpus, tmp_path / "run", "train.steps=20", "train.log_every=3", "train.eval_every=100",
                       "train.save_every=100")
    result = run_task(config, processes=2)
    assert len(calls) == 3 and not any(calls)
    assert result["interrupted"] == "SIGTERM" and result["step"] == 9  # checks at steps 3, 6 and 9 only
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()] == ["9"]
    calls.clear(), stop_at.clear()
    run_task(config, processes=2)  # resumed: checks at 12, 15, 18 and the last step, 20
    assert len(calls) == 4


class Recording(loop.Loop):
    """Records, for every step's metrics, how many steps had been dispatched when they were read."""

    def _flush(self):
        if self.pending is not None:
            self.reads.append((self.pending[0], int(jax.device_get(self.state.step))))
        super()._flush()


def test_finetuning_reads_metrics_a_step_behind_and_evaluates_each_epoch(corpus, tmp_path):
    reads = []
    run_task(ft_config(corpus, tmp_path / "run", "train.save_every=100"), Recording, reads=reads)
    steps = 12  # 2 epochs of 6 batches
    evals = records(tmp_path / "run", "eval")
    assert [(r["step"], r["epoch"]) for r in evals] == [(6, 1), (12, 2)]
    assert all(0 <= r["dev_accuracy"] <= 1 and r["dev_loss"] > 0 for r in evals)
    assert [r["step"] for r in records(tmp_path / "run")] == list(range(1, steps + 1))
    behind = {step for step, dispatched in reads if dispatched > step}
    assert behind == set(range(1, steps + 1)) - {6, 12}  # only evaluation steps wait for their own metrics


def test_finetuning_data_order_resumes_mid_epoch(corpus, tmp_path):
    from gpt_jax.finetune import FinetuneTask

    task = FinetuneTask(ft_config(corpus, tmp_path / "run"), verbose=False)
    straight = task.batches({"epoch": 0, "cursor": 0})
    seen = [next(straight) for _ in range(9)]
    assert seen[5][1] == {"epoch": 0, "cursor": 48} and seen[6][1] == {"epoch": 1, "cursor": 8}
    resumed = task.batches(seen[3][1])  # from the state saved after the 4th batch
    for batch, state in seen[4:]:
        again, again_state = next(resumed)
        assert again_state == state
        jax.tree.map(np.testing.assert_array_equal, again, batch)
    first_epoch = np.concatenate([b["labels"][0][b["weight"][0] > 0] for b, _ in seen[:6]])
    assert len(first_epoch) == 44  # every example once per epoch
