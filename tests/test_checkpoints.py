"""Run folders and checkpoints (rebel_diffusion.checkpoints): finding, verifying, writing, and what a resume may change."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from configs.base import get_config
from rebel_diffusion.checkpoints import (RESUMABLE_KEYS, RUN_KEYS, _truncate_metrics, check_resumable, find_checkpoint,
                                         flat_config, resume_checkpoint, verify_checkpoint)
from rebel_diffusion.errors import CheckpointError, ConfigError
from rebel_diffusion.trainer import train, validate_config

from test_trainer import read_metrics, text_config, tiny_config

REPO = Path(__file__).resolve().parents[1]


def test_resume_drops_metrics_lines_past_the_checkpoint_and_a_line_cut_by_a_crash(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 0}\n{"epoch": 1}\n{"epoch": 2}\n{"epoch": 3, "rew')
    _truncate_metrics(path, 2)
    assert path.read_text() == '{"epoch": 0}\n{"epoch": 1}\n'
    path.write_text('{"epoch": 0}\n{"epo')
    _truncate_metrics(path, 5)
    assert path.read_text() == '{"epoch": 0}\n'


def test_a_run_folder_stopped_before_its_first_checkpoint_starts_over(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "epoch_0001.tmp").mkdir(parents=True)  # killed while writing its first checkpoint
    with pytest.raises(ConfigError, match="neither a checkpoint nor a run folder"):
        resume_checkpoint(run)  # not a run folder: no config.json
    (run / "config.json").write_text(json.dumps({"model_type": "llama"}))  # a model's config: not a run folder
    with pytest.raises(ConfigError, match="neither a checkpoint nor a run folder"):
        resume_checkpoint(run)
    (run / "config.json").write_text(get_config().to_json())
    assert resume_checkpoint(run) is None
    # A full fine-tune's checkpoint holds the model's config.json beside checkpoint.json: it is a checkpoint.
    checkpoint = run / "checkpoints" / "epoch_0001"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text(get_config().to_json())
    (checkpoint / "checkpoint.json").write_text('{"epoch": 1}')
    assert resume_checkpoint(checkpoint) == checkpoint


def test_crash_while_checkpointing_keeps_the_last_good_checkpoint(tiny_lcm_path, tmp_path, monkeypatch):
    original = Accelerator.save_state
    calls = []

    def flaky_save_state(self, output_dir, **kwargs):
        calls.append(output_dir)
        if len(calls) == 2:
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            Path(output_dir, "optimizer.bin").write_bytes(b"half written")
            raise KeyboardInterrupt
        return original(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", flaky_save_state)
    config = tiny_config(tiny_lcm_path, tmp_path, num_epochs=3)
    with pytest.raises(KeyboardInterrupt):
        train(config)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert find_checkpoint(tmp_path / "run") == checkpoints / "epoch_0001"
    assert not (checkpoints / "epoch_0002").exists()
    # A replaced checkpoint whose deletion was cut short must not be taken for a newer one either.
    (checkpoints / "epoch_0009.old").mkdir()
    (checkpoints / "epoch_0009.old" / "checkpoint.json").write_text('{"epoch": 9}')
    assert find_checkpoint(tmp_path / "run") == checkpoints / "epoch_0001"
    monkeypatch.setattr(Accelerator, "save_state", original)
    config.resume_from = str(tmp_path / "run")
    train(config)  # resumes from epoch 1 and rewrites epochs 1 and 2 once each
    assert [m["epoch"] for m in read_metrics(tmp_path / "run")] == [0, 1, 2]


def test_a_full_disk_stops_the_run_and_keeps_the_previous_checkpoint(tiny_lcm_path, tmp_path, monkeypatch):
    import errno

    original = Accelerator.save_state
    calls = []

    def disk_full(self, output_dir, **kwargs):
        calls.append(output_dir)
        if len(calls) == 2:  # the second checkpoint runs out of space half-way
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            Path(output_dir, "optimizer.bin").write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", disk_full)
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint .*epoch_0002: No space left on device; "
                                                      r"\d+ MiB free on that disk; the previous checkpoint .*epoch_0001 "
                                                      r"is intact"):
        train(tiny_config(tiny_lcm_path, tmp_path, num_epochs=3))
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["epoch_0001"]  # no half-written folder left
    verify_checkpoint(checkpoints / "epoch_0001")  # loadable


@pytest.fixture(scope="module")
def two_checkpoint_run(tiny_lcm_path, tmp_path_factory) -> Path:
    return train(tiny_config(tiny_lcm_path, tmp_path_factory.mktemp("two"), num_epochs=2, **{"grid.num_prompts": 0}))


@pytest.mark.parametrize("damaged", ["optimizer.bin", "pytorch_lora_weights.safetensors", "stat_tracker.json",
                                     "random_states_0.pkl", "checkpoint.json"])
def test_a_damaged_checkpoint_file_is_named_and_the_previous_checkpoint_offered(two_checkpoint_run, tiny_lcm_path,
                                                                                tmp_path, damaged):
    run_dir = tmp_path / "run"
    shutil.copytree(two_checkpoint_run, run_dir)
    file = run_dir / "checkpoints" / "epoch_0002" / damaged
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    config = tiny_config(tiny_lcm_path, tmp_path, num_epochs=3, resume_from=str(run_dir))
    with pytest.raises(ConfigError, match=rf"checkpoint file .*epoch_0002/{damaged} is damaged .*"
                                          rf"--config.resume_from=.*epoch_0001$"):
        validate_config(config)


# ---- Nothing in a checkpoint is unpickled as an object ----

class _Planted:
    """A pickle that, loaded as an object, creates the file `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


@pytest.fixture(scope="module")
def text_run(tmp_path_factory) -> Path:
    """A finished 1-epoch run of the text quickstart cut to seconds, with one checkpoint (epoch_0001)."""
    return train(text_config(tmp_path_factory.mktemp("text"), num_epochs=1))


def test_a_checkpoint_holds_its_states_as_json_and_a_copy_of_its_config(text_run):
    checkpoint = text_run / "checkpoints" / "epoch_0001"
    assert not list(checkpoint.glob("custom_checkpoint_*")), "accelerate pickled a custom object"
    assert json.loads((checkpoint / "stat_tracker.json").read_text())["buffer_size"] == 16
    assert json.loads((checkpoint / "checkpoint.json").read_text())["epoch"] == 1
    assert json.loads((checkpoint / "training_config.json").read_text())["algorithm"] == "rebel"


@pytest.mark.parametrize("planted", ["random_states_0.pkl", "optimizer.bin", "custom_checkpoint_0.pkl"])
def test_a_planted_pickle_is_refused_by_verification_and_by_resume_and_never_run(text_run, tmp_path, planted):
    run_dir = tmp_path / "run"
    shutil.copytree(text_run, run_dir)
    marker = tmp_path / "pwned"
    file = run_dir / "checkpoints" / "epoch_0001" / planted
    torch.save(_Planted(marker), file)
    config = text_config(tmp_path, num_epochs=2, run_name="", resume_from=str(run_dir))
    message = rf"checkpoint file .*epoch_0001/{planted} is refused: it holds objects other than tensors"
    with pytest.raises(ConfigError, match=message):
        verify_checkpoint(file.parent)
    with pytest.raises(ConfigError, match=message):
        train(config)
    assert not marker.exists()
    torch.load(file, weights_only=False)  # the planted pickle is live: loaded as an object, it runs
    assert marker.exists()


def test_a_checkpoint_of_the_pickled_format_resumes_with_its_states_read_as_data(text_run, tmp_path):
    """Checkpoints written before the JSON states hold accelerate's custom_checkpoint_0.pkl (stat tracker) and _1.pkl
    (progress), and no config copy: they resume, and to the same result as the JSON format."""
    legacy, current = tmp_path / "legacy", tmp_path / "current"
    for folder in (legacy, current):
        shutil.copytree(text_run, folder)
    checkpoint = legacy / "checkpoints" / "epoch_0001"
    torch.save(json.loads((checkpoint / "stat_tracker.json").read_text()), checkpoint / "custom_checkpoint_0.pkl")
    torch.save(json.loads((checkpoint / "checkpoint.json").read_text()), checkpoint / "custom_checkpoint_1.pkl")
    (checkpoint / "stat_tracker.json").unlink()
    (checkpoint / "training_config.json").unlink()
    for folder in (legacy, current):
        train(text_config(tmp_path, num_epochs=2, run_name="", resume_from=str(folder)))
    assert read_metrics(legacy)[1]["loss"] == read_metrics(current)[1]["loss"]
    assert read_metrics(legacy)[1]["reward_mean"] == read_metrics(current)[1]["reward_mean"]


# ---- What a resume may change ----

def test_every_key_of_the_base_config_either_defines_the_run_or_may_change_on_resume():
    keys = set(flat_config(get_config()))
    assert not RUN_KEYS & RESUMABLE_KEYS, RUN_KEYS & RESUMABLE_KEYS
    assert keys - RUN_KEYS - RESUMABLE_KEYS == set(), "classify each new key in rebel_diffusion/checkpoints.py"
    assert (RUN_KEYS | RESUMABLE_KEYS) - keys == set(), "a classified key is gone from configs/base.py"


def _cli(*args: str, cwd: Path = REPO) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "train.py", *args, "--config.log_with="], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def _snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_resuming_with_another_run_s_config_lists_every_changed_key_and_exits_2(text_run):
    """Old behaviour: the PPO config resumed the finished REBEL run and relabeled its config.json; the image quickstart
    failed in the optimizer's load_state_dict."""
    before = _snapshot(text_run)
    common = [f"--config.resume_from={text_run}", f"--config.model.pretrained={REPO / 'assets' / 'tiny-lm'}",
              f"--config.prompt_file={REPO / 'assets' / 'addition_train_prompts.txt'}", "--config.num_epochs=1"]
    ppo = _cli("--config", "configs/quickstart_text_ppo.py", *common)
    image = _cli("--config", "configs/quickstart_rebel.py", f"--config.resume_from={text_run}", "--config.num_epochs=1")
    expected = {
        ppo: ["algorithm: 'rebel' -> 'ppo'", "sample.batch_size: 4 -> 1024", "train.batch_size: 2 -> 256",
              "train.gradient_accumulation_steps: 2 -> 1", "ppo.clip_range: 0.0001 -> 0.2",
              "ppo.adv_clip_max: 10.0 -> 5.0"],
        image: ["policy: 'causal_lm' -> 'lcm'", "model.pretrained: ", "reward.name: 'addition_exact' -> 'large_shape'",
                "lora.targets: 'lm_head' -> ''", "resolution: 512 -> 32"],
    }
    for process, parts in expected.items():
        out, err = process.communicate(timeout=300)
        lines = err.strip().splitlines()
        assert process.returncode == 2, err[-2000:]
        assert len(lines) == 1 and lines[0].startswith("error: cannot resume "), lines
        assert all(part in lines[0] for part in parts), lines[0]
        assert "rebel.eta" not in lines[0] and "Traceback" not in err + out
    assert "sample.num_batches_per_epoch" not in lines[0]  # unchanged keys are not listed
    assert _snapshot(text_run) == before


def test_a_finished_run_resumed_with_its_num_epochs_says_so_and_writes_nothing(text_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(text_run, run_dir)
    before = _snapshot(run_dir)
    config = text_config(tmp_path, num_epochs=1, run_name="", resume_from=str(run_dir), **{"eval.every": 3})
    assert train(config) == run_dir
    assert _snapshot(run_dir) == before
    with pytest.raises(ConfigError, match=r"num_epochs=0 is below the 1 epochs checkpoint .*epoch_0001 has done"):
        check_resumable(text_config(tmp_path, num_epochs=0), run_dir / "checkpoints" / "epoch_0001")


def test_a_changed_learning_rate_takes_effect_on_resume_and_is_recorded(tmp_path, monkeypatch):
    """Old behaviour: the optimizer state brought back the checkpoint's learning rate, config.json said otherwise."""
    one_step = {"train.gradient_accumulation_steps": 1}  # an optimizer step on the first micro-batch after the load
    run_dir = train(text_config(tmp_path, num_epochs=1, **one_step))
    used, step = [], torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        used.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    train(text_config(tmp_path, num_epochs=2, run_name="", resume_from=str(run_dir), save_freq=5,
                      **{"train.learning_rate": 3e-3, "eval.every": 7, **one_step}))
    assert used == [3e-3] * 4
    assert [m["lr"] for m in read_metrics(run_dir)] == [1e-2, 3e-3]
    recorded = json.loads((run_dir / "config.json").read_text())
    assert (recorded["train"]["learning_rate"], recorded["num_epochs"], recorded["save_freq"]) == (3e-3, 2, 5)
    copy = json.loads((run_dir / "checkpoints" / "epoch_0002" / "training_config.json").read_text())
    assert copy["train"]["learning_rate"] == 3e-3
