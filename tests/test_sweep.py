"""`python -m rebel_diffusion.sweep`: the space syntax, the objective, the worker loop on a shared study (with a fake
trainer, fast), and the real command on the tiny text LM as processes (slow: every trial is a train.py run)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from rebel_diffusion import sweep as sw

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/quickstart_text_rebel.py"
# The tiny addition LM at its smallest: 2 epochs of 4 prompts x 2 samples, no evaluation, no grids, no TensorBoard.
TINY = ["--config.num_epochs=2", "--config.save_freq=1", "--config.sample.batch_size=4", "--config.train.batch_size=2",
        "--config.eval.prompt_file=", "--config.grid.num_prompts=0", "--config.log_with="]
SPACE = "train.learning_rate=loguniform(1e-3,1e-1);rebel.eta=0.3,1,3"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


# ---- The space ----

def test_space_terms_parse_into_distributions():
    space = sw.parse_space(" train.learning_rate=loguniform(1e-4, 1e-2); rebel.eta=0.3,1,3 ;"
                           "train.num_inner_epochs=int(1,4);kl_coef=uniform(0,0.1);")
    assert space == [sw.Param("train.learning_rate", "loguniform", 1e-4, 1e-2),
                     sw.Param("rebel.eta", "categorical", choices=("0.3", "1", "3")),
                     sw.Param("train.num_inner_epochs", "int", 1, 4), sw.Param("kl_coef", "uniform", 0.0, 0.1)]


@pytest.mark.parametrize("text, message", [
    ("rebel.eta", "is not KEY=VALUES"),
    ("rebel.eta=", "is not KEY=VALUES"),
    ("rebel eta=1,2", "is not a config key"),
    ("seed=0,1", "the sweep sets seed"),
    ("rebel.eta=1,2;rebel.eta=3,4", "appears twice"),
    ("train.learning_rate=loguniform(1e-4)", "takes two numbers"),
    ("train.learning_rate=loguniform(a,1)", "takes two numbers, got 'a,1'"),
    ("train.learning_rate=loguniform(0,1)", "needs low > 0"),
    ("train.learning_rate=uniform(2,1)", "low must be below high"),
    ("train.num_inner_epochs=int(1,2.5)", "takes two integers"),
    ("train.learning_rate=normal(0,1)", "unknown distribution"),
    ("rebel.eta=1,,3", "an empty value"),
    ("rebel.eta=1", "a comma list needs two values"),
    ("rebel.eta=1,1", "a value appears twice"),
    ("; ;", "--space is empty"),
])
def test_a_bad_space_term_is_named_in_one_line(text, message):
    with pytest.raises(sw.SweepError) as error:
        sw.parse_space(text)
    assert message in str(error.value) and "\n" not in str(error.value)
    if text.strip("; "):  # the term is named
        assert repr(text.split(";")[-1].strip()) in str(error.value)


def test_space_keys_and_types_are_checked_against_the_config():
    from configs.quickstart_text_rebel import get_config

    config = get_config()
    sw.check_space(sw.parse_space(SPACE + ";train.num_inner_epochs=int(1,3);model.chat_template=true,false"), config)
    cases = {"train.learnin_rate=loguniform(1e-4,1e-2)": 'unknown config key \'train.learnin_rate\' (did you mean '
                                                          '"train.learning_rate"?)',
             "train.batch_size=uniform(1,4)": "train.batch_size is int (128), but uniform draws floats",
             "reward.name=int(1,3)": "but int(a,b) draws integers",
             "train.batch_size=2,four": "'four' is not a int, the type of train.batch_size",
             "model.chat_template=yes,no": "'yes' is not a bool"}
    for text, message in cases.items():
        with pytest.raises(sw.SweepError) as error:
            sw.check_space(sw.parse_space(text), config)
        assert message in str(error.value), (text, str(error.value))


# ---- The objective ----

def write_run(run_dir: Path, rewards: list[float], checkpoint_epoch: int | None = None, num_epochs: int = 2) -> None:
    """A run folder as train.py leaves it: config.json, metrics.jsonl and, when given, a complete checkpoint."""
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {"algorithm": "rebel", "policy": "causal_lm", "reward": {"name": "addition_exact"}, "num_epochs": num_epochs}
    (run_dir / "config.json").write_text(json.dumps(config))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e, "reward_mean": r}) + "\n"
                                                   for e, r in enumerate(rewards)))
    if checkpoint_epoch is not None:
        checkpoint = run_dir / "checkpoints" / f"epoch_{checkpoint_epoch:04d}"
        checkpoint.mkdir(parents=True)
        (checkpoint / "checkpoint.json").write_text(json.dumps({"epoch": checkpoint_epoch}))


def test_the_objective_is_the_iqm_over_seeds_and_last_epochs(tmp_path):
    # Two seeds, 5 epochs each, the last 4 scored: 8 values; the IQM drops the 2 lowest and the 2 highest.
    write_run(tmp_path / "s0", [100.0, 0.0, 1.0, 2.0, 20.0])
    write_run(tmp_path / "s1", [-100.0, 3.0, 4.0, -5.0, 6.0])
    per_seed = [sw.last_values(tmp_path / name, "reward_mean", 4) for name in ("s0", "s1")]
    assert [list(v) for v in per_seed] == [[0.0, 1.0, 2.0, 20.0], [3.0, 4.0, -5.0, 6.0]]
    # sorted: -5 0 | 1 2 3 4 | 6 20; the plain mean would be 3.875
    assert sw.objective(per_seed) == pytest.approx((1 + 2 + 3 + 4) / 4)


def test_an_eval_metric_is_scored_over_the_last_evaluations(tmp_path):
    write_run(tmp_path / "run", [0.0] * 10)
    (tmp_path / "run" / "eval.jsonl").write_text("".join(json.dumps({"epoch": e, "eval_accuracy": a}) + "\n"
                                                         for e, a in [(0, 0.1), (5, 0.5), (10, 0.7)]))
    assert list(sw.last_values(tmp_path / "run", "eval_accuracy", 2)) == [0.5, 0.7]


def test_a_run_is_finished_when_its_last_checkpoint_has_all_its_epochs(tmp_path):
    write_run(tmp_path / "done", [0.0, 1.0], checkpoint_epoch=2)
    write_run(tmp_path / "half", [0.0, 1.0], checkpoint_epoch=1)
    write_run(tmp_path / "started", [0.0])
    assert [sw.run_finished(tmp_path / name) for name in ("done", "half", "started", "absent")] == [
        True, False, False, False]


# ---- The worker loop, with a fake train.py ----

def sweep_for(tmp_path: Path, trials: int, sampler: str = "random", out: Path | None = None, space: str = SPACE,
              **fields) -> sw.Sweep:
    fields = {"config": CONFIG, "overrides": (), "space": tuple(sw.parse_space(space)), "trials": trials, "seeds": 2,
              "jobs": 1, "storage": str(tmp_path / "study.log"), "study": "s", "out": out or tmp_path / "out",
              "sampler": sampler, "metric": "reward_mean", "last_epochs": 1, "direction": "maximize", "prune": False,
              "heartbeat_s": 60.0, **fields}
    return sw.Sweep(**fields)


class FakeTrain:
    """Stands in for the train.py subprocess: writes a finished run whose last reward is eta + learning rate +
    seed / 100, and records each run's folder and whether it was told to resume."""

    def __init__(self, seconds: float = 0.0, error: str | None = None) -> None:
        self.seconds, self.error, self.runs, self.lock = seconds, error, [], threading.Lock()

    def __call__(self, command: list[str], stdout, **kwargs) -> subprocess.CompletedProcess:
        time.sleep(self.seconds)
        if self.error is not None:
            stdout.write(f"a warning\n{self.error}\nepoch 1: sampling\n")
            return subprocess.CompletedProcess(command, 1)
        values = dict(a.removeprefix("--config.").split("=", 1) for a in command if a.startswith("--config."))
        run_dir = Path(values["logdir"]) / values["run_name"]
        with self.lock:
            self.runs.append((run_dir.name, "resume_from" in values))
        reward = float(values["rebel.eta"]) + float(values["train.learning_rate"]) + int(values["seed"]) / 100
        write_run(run_dir, [0.0, reward], checkpoint_epoch=2)
        return subprocess.CompletedProcess(command, 0)


def work(*sweeps: sw.Sweep, timeout: float = 60.0) -> None:
    """Run a worker for each sweep, side by side in threads; fail if they have not all returned within `timeout` (a
    worker that miscounts its budget never returns)."""
    workers = [threading.Thread(target=sw.work, args=(s,), daemon=True) for s in sweeps]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout)
        assert not worker.is_alive(), "a worker is still running"


def test_workers_sharing_a_study_finish_exactly_the_budget_with_distinct_trials(tmp_path, monkeypatch):
    fake = FakeTrain(seconds=0.05)
    monkeypatch.setattr(sw.subprocess, "run", fake)
    sweeps = [sweep_for(tmp_path, trials=5, out=tmp_path / name) for name in ("a", "b", "c")]
    sw.create_study(sweeps[0])
    work(*sweeps)
    study = optuna.load_study(study_name="s", storage=sw.open_storage(sweeps[0].storage))
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == 5 and len({t.user_attrs["run"] for t in complete}) == 5
    assert len(study.get_trials()) <= 5 + 2  # at most one surplus per other worker: a full budget makes them wait
    runs = [name for name, _ in fake.runs]
    assert len(runs) == 10 and len(set(runs)) == 10  # 5 trials x 2 seeds, none trained twice
    for trial in complete:  # each trial's objective is its own runs' (the IQM of 2 values: their mean)
        eta, lr = float(trial.params["rebel.eta"]), trial.params["train.learning_rate"]
        assert trial.value == pytest.approx(eta + lr + 0.005)


def test_a_dead_workers_trial_is_failed_and_queued_again_with_its_run_folders(tmp_path):
    sweep = sweep_for(tmp_path, trials=4)
    sw.create_study(sweep)
    study = sw.load_study(sweep)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid, now, here = int(dead.stdout), time.time(), sw.socket.gethostname()
    attrs = {  # run -> who ran it
        "000": {"host": here, "pid": dead_pid, "heartbeat": now, "heartbeat_s": 60.0},  # its process is gone
        "001": {"host": "elsewhere", "pid": dead_pid, "heartbeat": now, "heartbeat_s": 60.0},  # another machine's
        "002": {"host": "elsewhere", "pid": 1, "heartbeat": now - 200, "heartbeat_s": 60.0},  # missed 3 beats
        "003": {"host": here, "pid": os.getpid(), "heartbeat": now - 100, "heartbeat_s": 60.0},  # missed 1
    }
    params = {}
    for run, who in attrs.items():
        trial = study.ask()
        params[run] = {p.key: p.suggest(trial) for p in sweep.space}
        for key, value in {"run": run, **who}.items():
            trial.set_user_attr(key, value)
    sw.fail_stale(study, sweep.heartbeat_s)
    trials = study.get_trials()
    assert [t.state for t in trials[:4]] == [TrialState.FAIL, TrialState.RUNNING, TrialState.FAIL, TrialState.RUNNING]
    queued = trials[4:]
    assert [(t.state, t.user_attrs["run"]) for t in queued] == [(TrialState.WAITING, "000"), (TrialState.WAITING, "002")]
    assert [t.system_attrs["fixed_params"] for t in queued] == [params["000"], params["002"]]
    assert not any(sw.counts(t) for t in trials if t.state == TrialState.FAIL)  # the retries take their places
    sw.fail_stale(study, sweep.heartbeat_s)
    assert len(study.get_trials()) == 6  # failed once, queued once


def test_a_retried_trial_reuses_its_finished_runs_and_resumes_the_interrupted_one(tmp_path, monkeypatch):
    fake = FakeTrain()
    monkeypatch.setattr(sw.subprocess, "run", fake)
    sweep = sweep_for(tmp_path, trials=1)
    sw.create_study(sweep)
    sw.load_study(sweep).enqueue_trial({"train.learning_rate": 0.01, "rebel.eta": "3"}, user_attrs={"run": "007"})
    write_run(sweep.out / "trials" / "007-seed0", [0.0, 5.0], checkpoint_epoch=2)  # finished before the crash
    write_run(sweep.out / "trials" / "007-seed1", [0.0], checkpoint_epoch=1)  # interrupted in its second epoch
    work(sweep)
    assert fake.runs == [("007-seed1", True)]
    assert sw.load_study(sweep).get_trials()[0].value == pytest.approx((5.0 + 3.01 + 0.01) / 2)


def test_a_study_of_another_sweep_is_refused(tmp_path):
    sw.create_study(sweep_for(tmp_path, trials=2))
    sw.create_study(sweep_for(tmp_path, trials=5, jobs=2, out=tmp_path / "b"))  # the same sweep, more of it
    with pytest.raises(sw.SweepError, match="is another sweep \\(its space, seeds differ\\)"):
        sw.create_study(sweep_for(tmp_path, trials=2, seeds=3, space="rebel.eta=1,3"))
    with pytest.raises(sw.SweepError, match="is to maximize its objective"):
        sw.create_study(sweep_for(tmp_path, trials=2, direction="minimize"))


def test_a_trial_whose_training_fails_counts_and_keeps_the_error_line(tmp_path, monkeypatch):
    monkeypatch.setattr(sw.subprocess, "run", FakeTrain(error="error: epoch 1: reward nan for prompt '1+1='"))
    sweep = sweep_for(tmp_path, trials=2)
    sw.create_study(sweep)
    work(sweep)  # returns: failed trials are finished trials, or a sweep that always fails would never end
    trials = sw.load_study(sweep).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL] * 2
    assert trials[0].user_attrs["error"] == "seed 0: exit 1: error: epoch 1: reward nan for prompt '1+1='"
    assert sw.report(sweep, None) == 1 and "reward nan" in (sweep.out / "trials.md").read_text()


def test_a_trial_asked_beyond_the_budget_is_surplus(tmp_path):
    sweep = sweep_for(tmp_path, trials=2)
    sw.create_study(sweep)
    study = sw.load_study(sweep)
    first, second, third = study.ask(), study.ask(), study.ask()  # two workers counted 1 trial and asked at once
    assert not sw.surplus(study, second, 2) and sw.surplus(study, third, 2)
    study.tell(first, state=TrialState.FAIL)  # failed as stale, without an error: its place is free again
    assert not sw.surplus(study, third, 2)


def test_pruning_stops_a_trial_below_the_median_after_its_first_seed(tmp_path, monkeypatch):
    fake = FakeTrain()
    monkeypatch.setattr(sw.subprocess, "run", fake)
    sweep = sweep_for(tmp_path, trials=6, prune=True)
    sw.create_study(sweep)
    for eta in ("1", "3", "1", "3", "1", "0.3"):  # MedianPruner prunes from the 6th trial on
        sw.load_study(sweep).enqueue_trial({"train.learning_rate": 0.001, "rebel.eta": eta})
    work(sweep)
    trials = sw.load_study(sweep).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 5 + [TrialState.PRUNED]
    assert ("005-seed0", False) in fake.runs and ("005-seed1", False) not in fake.runs


def test_the_report_writes_the_table_the_plots_and_a_best_config_of_typed_values(tmp_path, monkeypatch):
    from configs.quickstart_text_rebel import get_config

    monkeypatch.setattr(sw.subprocess, "run", FakeTrain())
    sweep = sweep_for(tmp_path, trials=6, sampler="grid", space="train.learning_rate=0.001,0.01;rebel.eta=0.3,1,3",
                      overrides=("--config.num_epochs=2",), direction="minimize")
    sw.create_study(sweep)
    work(sweep)
    config = get_config()
    config.num_epochs = 2
    assert sw.report(sweep, config) == 0
    rows = (sweep.out / "trials.csv").read_text().splitlines()
    assert len(rows) == 7 and rows[0] == "trial,runs,state,reward_mean IQM,train.learning_rate,rebel.eta,error"
    for key in ("rebel.eta", "train.learning_rate"):
        assert (sweep.out / f"objective_vs_{key}.png").read_bytes()[:4] == b"\x89PNG"
    namespace: dict = {}
    exec((sweep.out / "best_config.py").read_text(), namespace)
    best = namespace["get_config"]()
    assert (best.train.learning_rate, best.rebel.eta) == (0.001, 0.3)  # the smallest objective: minimize
    assert isinstance(best.rebel.eta, float) and best.num_epochs == 2 and best.algorithm == "rebel"


# ---- The command, as processes ----

def sweep_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "rebel_diffusion.sweep", "--config", CONFIG, "--space", SPACE, "--last-epochs", "2",
            *args, *TINY]


@pytest.mark.parametrize("args, message", [
    (["--space", "rebel.eta=1"], "a comma list needs two values"),
    (["--sampler", "grid"], "--sampler grid takes comma lists only; train.learning_rate is loguniform"),
    (["--jobs", "0"], "--jobs must be at least 1"),
    (["--bogus"], "unrecognized argument '--bogus'"),
    (["--config.seed=3"], "--config.seed=3: the sweep sets it for every run"),
])
def test_bad_sweep_input_is_one_line_and_exit_2_before_any_trial(tmp_path, args, message):
    result = subprocess.run(sweep_command("--trials", "2", "--out", str(tmp_path / "out"), *args), cwd=REPO, env=ENV,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and message in result.stderr
    assert not (tmp_path / "out" / "trials").exists()


@pytest.mark.slow  # loads the trainer to check the keys: ~10 s on 2 busy cores
def test_an_unknown_key_is_one_line_and_exit_2_before_any_trial(tmp_path):
    for args, message in [(["--space", "rebel.etta=1,3"], "unknown config key 'rebel.etta' (did you mean"),
                          (["--config.train.learnin_rate=1"], "unknown config key 'learnin_rate'")]:
        result = subprocess.run(sweep_command("--trials", "2", "--out", str(tmp_path / "out"), *args), cwd=REPO,
                                env=ENV, capture_output=True, text=True, timeout=300)
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


def read_study(storage: str, name: str = "sweep") -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=sw.open_storage(storage)).get_trials()


@pytest.mark.slow  # 2 train.py runs side by side and one of the best config: 1-2 minutes on 2 busy cores
def test_two_jobs_finish_the_trials_and_train_accepts_the_best_config(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(sweep_command("--trials", "2", "--jobs", "2", "--out", str(out)), cwd=REPO, env=ENV,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    trials = read_study(str(out / "study.log"))
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    assert sorted(p.name for p in (out / "trials").iterdir()) == ["000-seed0", "001-seed0"]
    assert len({t.user_attrs["pid"] for t in trials}) == 2  # one trial in each worker process
    for trial in trials:
        rewards = [json.loads(line)["reward_mean"]
                   for line in (out / "trials" / f"{trial.user_attrs['run']}-seed0" / "metrics.jsonl").read_text().splitlines()]
        assert trial.value == pytest.approx(np.mean(rewards[-2:]))
    assert len((out / "trials.md").read_text().splitlines()) == 4
    trained = subprocess.run([sys.executable, "train.py", "--config", str(out / "best_config.py"),
                              f"--config.logdir={tmp_path}", "--config.run_name=best", "--config.num_epochs=1"],
                             cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert trained.returncode == 0, trained.stderr[-3000:]
    config = json.loads((tmp_path / "best" / "config.json").read_text())
    best = max(trials, key=lambda t: t.value)
    assert config["train"]["learning_rate"] == best.params["train.learning_rate"]
    assert config["rebel"]["eta"] == float(best.params["rebel.eta"]) and config["sample"]["batch_size"] == 4


def wait_for(condition, timeout: float, process: subprocess.Popen) -> None:
    start = time.monotonic()
    while not condition():
        assert process.poll() is None, "the sweep ended before the moment to kill it"
        assert time.monotonic() - start < timeout, "timed out"
        time.sleep(0.05)


@pytest.mark.slow  # 4 train.py runs one after another: 2-4 minutes on 2 busy cores
def test_a_killed_sweep_resumes_without_redoing_finished_trials(tmp_path):
    out, storage = tmp_path / "out", f"sqlite:///{tmp_path / 'study.db'}"
    command = sweep_command("--trials", "3", "--out", str(out), "--storage", storage, "--heartbeat", "2")
    with (tmp_path / "first.log").open("w") as log:
        first = subprocess.Popen(command, cwd=REPO, env=ENV, stdout=log, stderr=log, start_new_session=True)
    try:
        # Killed once the second trial's run is launched (its log opened, seconds before train.py can finish; its
        # config.json came too late on an idle machine, where the tiny run can end within one poll): the first trial
        # is finished, the second not.
        wait_for(lambda: (out / "trials" / "001-seed0" / "sweep.log").is_file(), 400, first)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    finished_log = (out / "trials" / "000-seed0" / "sweep.log").read_text()
    assert sw.run_finished(out / "trials" / "000-seed0") and not sw.run_finished(out / "trials" / "001-seed0")
    result = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "left running by a dead worker; queued again" in result.stderr
    trials = read_study(storage)
    assert [(t.state, t.user_attrs["run"]) for t in trials] == [
        (TrialState.COMPLETE, "000"), (TrialState.FAIL, "001"), (TrialState.COMPLETE, "001"),
        (TrialState.COMPLETE, "003")]
    assert trials[1].params == trials[2].params  # the retry trains the interrupted trial's values, in its folders
    assert (out / "trials" / "000-seed0" / "sweep.log").read_text() == finished_log  # not trained again
    assert sorted(p.name for p in (out / "trials").iterdir()) == ["000-seed0", "001-seed0", "003-seed0"]


@pytest.mark.slow  # 3 train.py runs from 2 sweeps side by side: 2-3 minutes on 2 busy cores
def test_two_sweeps_on_one_storage_share_one_study(tmp_path):
    storage = str(tmp_path / "shared" / "study.log")
    processes = [subprocess.Popen(sweep_command("--trials", "3", "--out", str(tmp_path / name), "--storage", storage),
                                  cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for name in ("a", "b")]
    for process in processes:
        assert process.wait(timeout=900) == 0, process.stderr.read()[-3000:]
    trials = read_study(storage)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 3 and len({t.user_attrs["run"] for t in complete}) == 3
    assert all(sw.counts(t) == (t.state == TrialState.COMPLETE) for t in trials)  # anything else was surplus
    folders = [p.name for name in ("a", "b") if (tmp_path / name / "trials").is_dir()
               for p in (tmp_path / name / "trials").iterdir()]
    assert sorted(folders) == sorted(f"{t.user_attrs['run']}-seed0" for t in complete)  # each trial trained once
    for name in ("a", "b"):  # each machine's report shows the whole study
        assert len((tmp_path / name / "trials.md").read_text().splitlines()) == 2 + 3


@pytest.mark.parametrize("signal_number, requeued", [(signal.SIGTERM, True), (signal.SIGINT, True),
                                                     (signal.SIGKILL, False)])
def test_a_run_stopped_by_a_signal_is_queued_again_not_counted_as_a_failure(tmp_path, monkeypatch, signal_number,
                                                                             requeued):
    def stopped(command, stdout, **kwargs):
        stdout.write("epoch 1: sampling\n")
        return subprocess.CompletedProcess(command, -signal_number)

    monkeypatch.setattr(sw.subprocess, "run", stopped)
    sweep = sweep_for(tmp_path, trials=1)
    sw.create_study(sweep)
    if requeued:
        with pytest.raises(SystemExit) as stop:
            sw.work(sweep)
        assert stop.value.code == sw.INTERRUPTED_EXIT
        first, retry = sw.load_study(sweep).get_trials()
        assert first.state == TrialState.FAIL and not sw.counts(first)  # takes no place of the budget
        assert retry.state == TrialState.WAITING and retry.user_attrs["run"] == first.user_attrs["run"]
        assert retry.system_attrs["fixed_params"] == first.params
        # Started again with a training that works, the sweep trains the queued trial in the same run folders.
        fake = FakeTrain()
        monkeypatch.setattr(sw.subprocess, "run", fake)
        work(sweep)
        assert [name for name, _ in fake.runs] == [f"{first.user_attrs['run']}-seed0", f"{first.user_attrs['run']}-seed1"]
        assert sw.load_study(sweep).get_trials()[1].state == TrialState.COMPLETE
    else:  # SIGKILL is also what the out-of-memory killer sends: a trial that does not fit fails, and counts
        work(sweep)
        (trial,) = sw.load_study(sweep).get_trials()
        assert trial.state == TrialState.FAIL and sw.counts(trial)
        assert trial.user_attrs["error"].startswith(f"seed 0: exit -{int(signal_number)}")
