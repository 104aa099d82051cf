"""Text rewards: learned reward models (sequence classifiers and scalar-head checkpoints), exact addition, TRL functions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import build_char_tokenizer
from safetensors.torch import save_file
from transformers import (
    AutoModelForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2Model,
    LlamaConfig,
    LlamaForSequenceClassification,
)

from rebel_diffusion.rewards import RewardSetupError, make_reward_fn, reward_kind

PROMPTS = ["12+3=", "ab ", "h", "1+1="]
RESPONSES = ["15", "cdefg 0", "", "3"]
CHAT_TEMPLATE = "{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token }}{% endif %}{{ m['content'] }}={% endfor %}"


def save_classifier(directory: Path, arch: str, chat_template: str | None = None) -> Path:
    """A random one-label GPT-2 or Llama sequence classifier with a character tokenizer."""
    tokenizer = build_char_tokenizer(chat_template=chat_template)
    torch.manual_seed(0)
    ids = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, num_labels=1)
    if arch == "gpt2":
        model = GPT2ForSequenceClassification(GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2,
                                                         n_head=4, **ids))
    else:
        model = LlamaForSequenceClassification(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32,
                                                           intermediate_size=64, num_hidden_layers=2,
                                                           num_attention_heads=4, max_position_embeddings=64, **ids))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("chat", [False, True])
def test_sequence_classifier_reward(tmp_path: Path, arch: str, chat: bool) -> None:
    path = save_classifier(tmp_path / "rm", arch, CHAT_TEMPLATE if chat else None)
    reward_fn = make_reward_fn("reward_model", device="cpu", reward_model_path=str(path), reward_batch_size=3)
    scores = reward_fn(RESPONSES, PROMPTS)
    assert scores.shape == (4,) and scores.dtype == torch.float32

    # Independently: each text alone (no padding), read at its last token.
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    tokenizer = build_char_tokenizer()
    expected = []
    for prompt, response in zip(PROMPTS, RESPONSES):
        # The template renders "<bos>prompt=response="; without one, the tokenizer adds BOS to prompt + response.
        ids = tokenizer(prompt + "=" + response + "=" if chat else prompt + response)["input_ids"]
        with torch.no_grad():
            expected.append(model(input_ids=torch.tensor([ids])).logits[0, 0])
    torch.testing.assert_close(scores, torch.stack(expected), atol=1e-5, rtol=0)


@pytest.mark.parametrize("prefixed", [True, False])
def test_scalar_head_reward(tmp_path: Path, prefixed: bool) -> None:
    tokenizer = build_char_tokenizer()
    torch.manual_seed(0)
    backbone = GPT2Model(GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=4))
    backbone.eval()  # no dropout in the independent computation
    head = torch.nn.Linear(32, 1)
    path = tmp_path / "scalar"
    path.mkdir()
    # The layout of the REBEL paper's TL;DR reward models: a ScalarModelConfig plus lm_backbone.* and scalar_head.*.
    config = {"base_model": "gpt2", "base_config": backbone.config.to_dict(), "hidden_size": 32, "bias": 0.5}
    (path / "config.json").write_text(json.dumps(config))
    prefix = "lm_backbone." if prefixed else ""
    state = {prefix + k: v.contiguous() for k, v in backbone.state_dict().items()}
    state.update({f"scalar_head.{k}": v for k, v in head.state_dict().items()})
    save_file(state, str(path / "model.safetensors"))
    tokenizer.save_pretrained(path)

    scores = make_reward_fn("reward_model", reward_model_path=str(path), reward_batch_size=2)(RESPONSES, PROMPTS)
    expected = []
    with torch.no_grad():
        for prompt, response in zip(PROMPTS, RESPONSES):
            ids = torch.tensor([tokenizer(prompt + response)["input_ids"]])
            expected.append(head(backbone(input_ids=ids).last_hidden_state[0, -1])[0] - 0.5)
    torch.testing.assert_close(scores, torch.stack(expected), atol=1e-5, rtol=0)


def test_reward_model_that_does_not_load(tmp_path: Path) -> None:
    with pytest.raises(RewardSetupError, match="not a model folder"):
        make_reward_fn("reward_model", reward_model_path=str(tmp_path / "missing"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{}")
    with pytest.raises(RewardSetupError, match="cannot load reward model"):
        make_reward_fn("reward_model", reward_model_path=str(tmp_path / "broken"))


def test_addition_exact() -> None:
    reward_fn = make_reward_fn("addition_exact")
    prompts = ["17+25=", "17+25=", "17+25=", "99+99=", "10+10="]
    scores = reward_fn([" 42 ", "42.0", "4", "198", "20x"], prompts)
    assert scores.tolist() == [1.0, 0.0, 0.0, 1.0, 0.0] and scores.dtype == torch.float32
    assert reward_kind("addition_exact") == reward_kind("reward_model") == "text"
    with pytest.raises(ValueError, match="a\\+b="):
        reward_fn(["1"], ["what is 1+1?"])


def test_trl_signature_function(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_trl_rewards.py").write_text(
        "def length_reward(prompts, completions, **kwargs):\n"
        "    return [len(c) - len(p) for p, c in zip(prompts, completions)]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    scores = make_reward_fn("my_trl_rewards:length_reward")(["abcd", "a"], ["ab", "ab"])
    assert scores.dtype == torch.float32 and scores.tolist() == [2.0, -1.0]
