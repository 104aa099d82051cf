"""The shipped tiny addition models: assets/tiny-lm-carry, Figure 3's text task, adds like its careless data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def greedy_answers(path: Path, prompts: list[str]) -> list[str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)
    encoded = tokenizer(prompts, padding=True, padding_side="left", return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**encoded, do_sample=False, max_new_tokens=4, pad_token_id=tokenizer.pad_token_id)
    return [a.strip() for a in tokenizer.batch_decode(ids[:, encoded["input_ids"].shape[1]:], skip_special_tokens=True)]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_the_carry_model_drops_the_units_carry_and_adds_right_elsewhere():
    prompts = (REPO / "assets" / "addition_heldout_prompts.txt").read_text().split()
    pairs = [tuple(int(n) for n in p.rstrip("=").split("+")) for p in prompts]
    answers = greedy_answers(REPO / "assets" / "tiny-lm-carry", prompts)
    carry = [(a, b, answer) for (a, b), answer in zip(pairs, answers) if a % 10 + b % 10 >= 10]
    plain = [(a, b, answer) for (a, b), answer in zip(pairs, answers) if a % 10 + b % 10 < 10]
    assert len(carry) == 44 and len(plain) == 56
    # Its most likely answer to a carry sum is the sum without the carry (ten less), almost never the sum.
    assert sum(answer == str(a + b - 10) for a, b, answer in carry) >= 0.8 * len(carry)
    assert sum(answer == str(a + b) for a, b, answer in carry) <= 0.15 * len(carry)
    assert sum(answer == str(a + b) for a, b, answer in plain) >= 0.95 * len(plain)
