"""Tests of `python -m rebel_diffusion.sample`: sampling a real (tiny) training run's checkpoint beside its base model,
sampling a text checkpoint, and the one-line refusals of bad inputs."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont
from safetensors.torch import load_file, save_file

from configs.base import get_config
from rebel_diffusion.checkpoints import CHECKPOINT_FILE
from rebel_diffusion.grids import CELL, HEADER_HEIGHT, LABEL_WIDTH, tile_box
from rebel_diffusion.policies import make_policy
from rebel_diffusion.rewards import make_reward_fn
from rebel_diffusion.sample import main, win_rate
from rebel_diffusion.trainer import train
from tests.conftest import save_tiny_causal_lm

LORA_FILE = "pytorch_lora_weights.safetensors"
PROMPTS = ["a red circle on a white background", "a blue square on a black background"]


@pytest.fixture(scope="module")
def lcm_run(tiny_lcm_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-epoch REBEL run on the tiny LCM, as the trainer lays it out."""
    root = tmp_path_factory.mktemp("sample_run")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    config = get_config()
    config.model.pretrained = str(tiny_lcm_path)
    config.prompt_file = str(root / "prompts.txt")
    config.resolution = 32
    config.logdir = str(root)
    config.run_name = "run"
    config.log_with = ""
    config.num_epochs = 1
    config.sample.batch_size = 2
    config.sample.num_batches_per_epoch = 1
    config.train.batch_size = 1
    config.train.gradient_accumulation_steps = 2
    config.stat_tracker.min_count = 2
    config.grid.num_prompts = 0
    # peft starts LoRA B at zero and Adam moves it by about the learning rate per step: at the default 3e-4 one step
    # changes no pixel of a tiny random model after uint8 rounding, so take large steps.
    config.train.learning_rate = 0.1
    return train(config)


def read_png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def header_text(lines: list[str]) -> np.ndarray:
    """A header cell drawn independently of rebel_diffusion.grids: PIL's default font, black on white, 4 px in, one
    line per 13 px."""
    cell = Image.new("RGB", (CELL, HEADER_HEIGHT), "white")
    draw = ImageDraw.Draw(cell)
    for i, line in enumerate(lines):
        draw.text((4, 4 + 13 * i), line, fill="black", font=ImageFont.load_default())
    return np.asarray(cell)


def run_main(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_checkpoint_samples_beside_the_base_model(lcm_run, tiny_lcm_path, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run_main(["--checkpoint", lcm_run, "--out", out, "--prompts", *PROMPTS, "--seeds", 3, 4,
                          "--compare-base"], capsys)
    assert code == 0, err
    index = json.loads((out / "samples.json").read_text())
    assert [(e["prompt"], e["seed"]) for e in index] == [(p, s) for p in PROMPTS for s in (3, 4)]
    for entry in index:
        tuned, base = read_png(out / entry["file"]), read_png(out / entry["base_file"])
        assert tuned.shape == base.shape == (32, 32, 3)
        assert np.abs(tuned.astype(int) - base.astype(int)).max() > 0, "the LoRA changed nothing"
    # grid.png: a header band over base | fine-tuned for each of the two seeds, every tile upscaled from its PNG.
    grid = np.asarray(Image.open(out / "grid.png").convert("RGB"))
    assert HEADER_HEIGHT >= 20 and CELL >= 128
    assert grid.shape == (HEADER_HEIGHT + 2 * CELL, LABEL_WIDTH + 2 * 2 * CELL, 3)
    labels = [f"{name}\nseed {seed}" for seed in (3, 4) for name in ("base", "fine-tuned")]
    for entry in index:
        row, seed_column = PROMPTS.index(entry["prompt"]), (3, 4).index(entry["seed"])
        for column, file in ((2 * seed_column, entry["base_file"]), (2 * seed_column + 1, entry["file"])):
            left, top, right, bottom = tile_box(row, column, labels)
            assert (left, top) == (LABEL_WIDTH + column * CELL, HEADER_HEIGHT + row * CELL)
            scale = CELL // 32
            upscaled = read_png(out / file).repeat(scale, axis=0).repeat(scale, axis=1)
            np.testing.assert_array_equal(grid[top:bottom, left:right], upscaled, err_msg=f"{file} at {row, column}")
    # The header says which is which: each column's band holds exactly the text "base" or "fine-tuned" over its tile.
    for column, label in enumerate(labels):
        band = grid[:HEADER_HEIGHT, LABEL_WIDTH + column * CELL : LABEL_WIDTH + (column + 1) * CELL]
        np.testing.assert_array_equal(band, header_text(label.split("\n")), err_msg=label)
    assert (grid[HEADER_HEIGHT:, :LABEL_WIDTH] < 128).any(), "no prompt drawn in the label column"

    # The base images are what the base model alone samples (no checkpoint: --model), seed for seed.
    base_out = tmp_path / "base"
    code, err = run_main(["--model", tiny_lcm_path, "--resolution", 32, "--out", base_out, "--prompts", *PROMPTS,
                          "--seeds", 3, 4], capsys)
    assert code == 0, err
    for entry, base_entry in zip(index, json.loads((base_out / "samples.json").read_text())):
        np.testing.assert_array_equal(read_png(out / entry["base_file"]), read_png(base_out / base_entry["file"]))


def test_checkpoint_folder_and_prompt_file(lcm_run, tmp_path, capsys):
    checkpoint = sorted((lcm_run / "checkpoints").glob("epoch_*"))[-1]
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text(PROMPTS[0] + "\n")
    code, err = run_main(["--checkpoint", checkpoint, "--out", tmp_path / "out", "--prompt-file", prompt_file], capsys)
    assert code == 0, err
    assert (tmp_path / "out" / "p000_s0.png").is_file() and (tmp_path / "out" / "grid.png").is_file()


def copy_run(run: Path, destination: Path) -> Path:
    """A copy of `run`, so a test may break its checkpoint; returns the copy's checkpoint folder."""
    shutil.copytree(run, destination)
    return sorted((destination / "checkpoints").glob("epoch_*"))[-1]


def rewrite_lora(checkpoint: Path, rename) -> None:
    state = load_file(str(checkpoint / LORA_FILE))
    save_file({rename(k): v for k, v in state.items()}, str(checkpoint / LORA_FILE))


@pytest.mark.parametrize(
    "breakage, message",
    [
        ("no_weights", "holds no LoRA weights"),
        ("wrong_prefix", "match none of this model's adapter layers"),
        ("unexpected_keys", "cannot load the LoRA weights"),
        ("missing_prompt_file", "prompts.txt"),
        ("not_a_checkpoint", "neither a checkpoint folder nor a run folder"),
        ("no_model", "--model is required"),
        ("base_compare_without_checkpoint", "--compare-base needs --checkpoint"),
        ("bad_flag", "unrecognized arguments"),
        ("bad_preference", "--preference 'nope': preference.name: unknown preference 'nope'"),
        ("preference_without_base", "--preference judges the fine-tuned model against the base model"),
        ("preference_of_text", "compares text outputs, but the policy produces image"),
    ],
)
def test_bad_inputs_exit_2_with_one_line(lcm_run, tmp_path, capsys, breakage, message):
    checkpoint = copy_run(lcm_run, tmp_path / "run")
    argv = ["--checkpoint", checkpoint, "--out", tmp_path / "out"]
    if breakage == "no_weights":
        (checkpoint / LORA_FILE).unlink()
    elif breakage == "wrong_prefix":
        rewrite_lora(checkpoint, lambda k: "transformer." + k.removeprefix("unet."))
    elif breakage == "unexpected_keys":
        rewrite_lora(checkpoint, lambda k: k.replace("to_q", "to_nowhere"))
    elif breakage == "missing_prompt_file":
        argv += ["--prompt-file", tmp_path / "prompts.txt"]
    elif breakage == "not_a_checkpoint":
        argv = ["--checkpoint", tmp_path, "--out", tmp_path / "out"]
    elif breakage == "no_model":
        argv = ["--out", tmp_path / "out"]
    elif breakage == "base_compare_without_checkpoint":
        argv = ["--model", "owner/model", "--out", tmp_path / "out", "--compare-base"]
    elif breakage == "bad_flag":
        argv += ["--steps", "3"]
    elif breakage == "bad_preference":
        argv += ["--compare-base", "--preference", "nope"]
    elif breakage == "preference_without_base":
        argv += ["--preference", "pickscore"]
    elif breakage == "preference_of_text":
        argv += ["--compare-base", "--preference", "bradley_terry", "--preference-option", "reward=addition_exact"]
    code, err = run_main(argv, capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert not (tmp_path / "out" / "grid.png").exists()


def test_win_rate_interval_is_student_t_over_the_per_prompt_means():
    # Per-prompt means 0.6, 0.7, 0.5, 0.6: mean 0.6, sd sqrt(0.02 / 3), t(0.975, 3 dof) = 3.182446 (a t table).
    probabilities = np.array([[0.5, 0.7], [0.9, 0.5], [0.2, 0.8], [0.6, 0.6]])
    rate, (low, high) = win_rate(probabilities)
    half = 3.182446 * math.sqrt(0.02 / 3) / math.sqrt(4)
    assert rate == pytest.approx(0.6) and (low, high) == pytest.approx((0.6 - half, 0.6 + half), abs=1e-6)
    # The interval is clipped to [0, 1]; one prompt has none (its seeds say nothing about other prompts).
    assert win_rate(np.array([[1.0, 1.0], [1.0, 1.0], [0.9, 0.9]]))[1][1] == 1.0
    assert win_rate(np.array([[0.2, 0.9, 0.4]])) == (pytest.approx(0.5), None)


def test_win_rate_against_the_base_model_with_a_bradley_terry_preference(lcm_run, tmp_path, capsys):
    out = tmp_path / "out"
    code = main([str(a) for a in ["--checkpoint", lcm_run, "--out", out, "--prompts", *PROMPTS, "--seeds", 3, 4,
                                  "--compare-base", "--preference", "bradley_terry", "--preference-option",
                                  "reward=large_shape", "--preference-option", "temperature=0.1"]])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads((out / "win_rate.json").read_text())
    # Each pair by hand: large_shape of the written fine-tuned and base PNGs, sigmoid of the difference over 0.1. The
    # PNGs' 8-bit rounding moves large_shape by up to ~3e-3, ~0.025 in probability after the temperature: a flipped
    # side (1 - p, here 0.1 or more away) or an ignored temperature (p near 0.5) is still far outside.
    large_shape = make_reward_fn("large_shape")
    index = json.loads((out / "samples.json").read_text())
    png = lambda name: torch.from_numpy(read_png(out / name).copy()).permute(2, 0, 1).float() / 255  # noqa: E731
    tuned = large_shape(torch.stack([png(e["file"]) for e in index]), [e["prompt"] for e in index])
    base = large_shape(torch.stack([png(e["base_file"]) for e in index]), [e["prompt"] for e in index])
    expected = 1 / (1 + np.exp(-(tuned - base).numpy() / 0.1))
    assert (tuned != base).any(), "the fine-tuned and base shapes score alike: the test would not see a flipped side"
    assert [(pair["prompt"], pair["seed"]) for pair in result["pairs"]] == [(e["prompt"], e["seed"]) for e in index]
    probabilities = np.array([pair["p_fine_tuned_beats_base"] for pair in result["pairs"]])
    np.testing.assert_allclose(probabilities, expected, atol=0.03)
    assert result["win_rate"] == pytest.approx(probabilities.mean(), abs=1e-6)
    assert (result["num_prompts"], result["num_seeds"]) == (2, 2) and len(result["ci95"]) == 2
    line = [line for line in captured.out.splitlines() if line.startswith("win rate")]
    assert line == [f"win rate against the base model: {result['win_rate']:.3f}, 95% CI [{result['ci95'][0]:.3f}, "
                    f"{result['ci95'][1]:.3f}], over 2 prompts x 2 seeds (preference 'bradley_terry'; "
                    f"{out / 'win_rate.json'})"]


def longer(prompts, responses_a, responses_b):
    """A user text preference: 1 when a is the longer response, 0 when b is, 0.5 for a tie."""
    return [0.5 + 0.5 * ((len(a) > len(b)) - (len(a) < len(b))) for a, b in zip(responses_a, responses_b)]


def test_text_checkpoint_writes_jsonl_with_base_responses(tmp_path, capsys):
    model_dir = save_tiny_causal_lm(tmp_path / "lm", "gpt2")
    config = get_config()
    config.policy = "causal_lm"
    config.model.pretrained = str(model_dir)
    config.model.max_new_tokens = 8
    config.lora.rank = 2
    policy = make_policy(config, torch.device("cpu"), torch.float32)
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in policy.trainable_parameters():
            parameter.add_(torch.randn_like(parameter))  # a "trained" adapter: far from the base
    run = tmp_path / "run"
    checkpoint = run / "checkpoints" / "epoch_0001"
    checkpoint.mkdir(parents=True)
    policy.save_lora(checkpoint)
    (checkpoint / CHECKPOINT_FILE).write_text("{}")
    (run / "config.json").write_text(config.to_json_best_effort())

    prompts = ["1+2=", "3+4="]
    code, err = run_main(["--checkpoint", run, "--out", tmp_path / "out", "--prompts", *prompts, "--seeds", 0, 1,
                          "--compare-base", "--preference", f"{__name__}:longer"], capsys)
    assert code == 0, err
    records = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["seed"]) for r in records] == [(p, s) for p in prompts for s in (0, 1)]
    assert all(isinstance(r["response"], str) and isinstance(r["base_response"], str) for r in records)
    assert any(r["response"] != r["base_response"] for r in records)
    # The win rate of a user text preference: each pair judged fine-tuned (a) against base (b).
    pairs = json.loads((tmp_path / "out" / "win_rate.json").read_text())["pairs"]
    assert [pair["p_fine_tuned_beats_base"] for pair in pairs] == longer(None, [r["response"] for r in records],
                                                                         [r["base_response"] for r in records])

    code, err = run_main(["--model", model_dir, "--policy", "causal_lm", "--out", tmp_path / "base", "--prompts",
                          *prompts, "--seeds", 0, 1], capsys)
    assert code == 0, err
    # config.json's max_new_tokens (8) is not used without a checkpoint, so compare the common prefix.
    base = [json.loads(line) for line in (tmp_path / "base" / "samples.jsonl").read_text().splitlines()]
    for record, base_record in zip(records, base):
        assert base_record["response"].startswith(record["base_response"])
