"""Text rewards: learned reward models (sequence classifiers and scalar-head checkpoints), exact addition, TRL functions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import build_char_tokenizer
from safetensors.torch import save_file
from tokenizers import processors
from transformers import (
    AutoModelForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2Model,
    LlamaConfig,
    LlamaForSequenceClassification,
)

from configs.base import get_config
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
        # The template renders "<bos>prompt=response=" (its turns do not end with EOS: nothing is appended); without
        # one, the tokenizer adds BOS to prompt + response, and the EOS the policy's response ended with is put back.
        if chat:
            ids = tokenizer(prompt + "=" + response + "=")["input_ids"]
        else:
            ids = tokenizer(prompt + response)["input_ids"] + [tokenizer.eos_token_id]
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
            # Read at the EOS of prompt + response + EOS, as the TL;DR reward models are.
            ids = torch.tensor([tokenizer(prompt + response)["input_ids"] + [tokenizer.eos_token_id]])
            expected.append(head(backbone(input_ids=ids).last_hidden_state[0, -1])[0] - 0.5)
    torch.testing.assert_close(scores, torch.stack(expected), atol=1e-5, rtol=0)


def save_last_token_scorer(directory: Path, tokenizer) -> Path:
    """A Llama sequence classifier without layers whose score is the id of the last non-pad token: one-hot embeddings,
    RMSNorm (x -> sqrt(d) x for a one-hot x) and a score head w_i = i / sqrt(d)."""
    hidden = 32
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=64, num_hidden_layers=0,
                         num_attention_heads=4, max_position_embeddings=64, num_labels=1, rms_norm_eps=0.0,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    model = LlamaForSequenceClassification(config)
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(len(tokenizer), hidden))
        model.score.weight.copy_(torch.arange(hidden, dtype=torch.float32)[None] / hidden**0.5)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture
def recorded_inputs(monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """The `input_ids` of every Llama sequence-classifier forward, each batch's real tokens as one list per row."""
    seen = []
    forward = LlamaForSequenceClassification.forward

    def recording(self, input_ids=None, attention_mask=None, **kwargs):
        seen.append([row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask)])
        return forward(self, input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    monkeypatch.setattr(LlamaForSequenceClassification, "forward", recording)
    return seen


def test_reward_model_reads_the_eos(tmp_path: Path, recorded_inputs: list) -> None:
    tokenizer = build_char_tokenizer()
    eos = tokenizer.eos_token_id
    path = save_last_token_scorer(tmp_path / "plain", tokenizer)
    # The options as the trainer passes them: every config.reward key but the name.
    options = {k: v for k, v in get_config().reward.items() if k != "name"}
    options.update(reward_model_path=str(path), reward_batch_size=3)
    scores = make_reward_fn("reward_model", device="cpu", **options)(RESPONSES, PROMPTS)
    # Read at the EOS appended once after prompt + response, whatever the response's last character.
    torch.testing.assert_close(scores, torch.full((4,), float(eos)), atol=1e-5, rtol=0)
    assert [ids for batch in recorded_inputs for ids in batch] == [
        tokenizer(p + r)["input_ids"] + [eos] for p, r in zip(PROMPTS, RESPONSES)]

    # A tokenizer without a pad token (GPT-2, Pythia): the padding must not hide the EOS the classifier scores at.
    recorded_inputs.clear()
    path = save_last_token_scorer(tmp_path / "no_pad", build_char_tokenizer(pad=False))
    scores = make_reward_fn("reward_model", reward_model_path=str(path), reward_batch_size=4)(RESPONSES, PROMPTS)
    torch.testing.assert_close(scores, torch.full((4,), float(eos)), atol=1e-5, rtol=0)

    # A tokenizer that appends EOS itself: not a second one.
    recorded_inputs.clear()
    appends = build_char_tokenizer()
    appends.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", appends.bos_token_id), ("<eos>", eos)])
    path = save_last_token_scorer(tmp_path / "appends", appends)
    scores = make_reward_fn("reward_model", reward_model_path=str(path))(RESPONSES, PROMPTS)
    torch.testing.assert_close(scores, torch.full((4,), float(eos)), atol=1e-5, rtol=0)
    rows = [ids for batch in recorded_inputs for ids in batch]
    assert all(ids[-1] == eos and ids[-2] != eos for ids in rows)

    # Chat templates decide: one that ends turns with EOS has written it once; one that ends them with "=" gets none.
    for template, last in [(CHAT_TEMPLATE.replace("={% endfor %}", "={{ eos_token }}{% endfor %}"), eos),
                           (CHAT_TEMPLATE, tokenizer.convert_tokens_to_ids("="))]:
        recorded_inputs.clear()
        path = save_last_token_scorer(tmp_path / f"chat{last}", build_char_tokenizer(chat_template=template))
        scores = make_reward_fn("reward_model", reward_model_path=str(path))(RESPONSES, PROMPTS)
        torch.testing.assert_close(scores, torch.full((4,), float(last)), atol=1e-5, rtol=0)
        rows = [ids for batch in recorded_inputs for ids in batch]
        # Nothing appended: the EOS template's two turns each end in one EOS, the other's in none.
        assert all(ids[-1] == last and ids[-2] != eos and ids.count(eos) == (2 if last == eos else 0) for ids in rows)


def test_reward_batch_size_takes_effect(tmp_path: Path, recorded_inputs: list) -> None:
    path = save_last_token_scorer(tmp_path / "rm", build_char_tokenizer())
    config = get_config()
    assert config.reward.reward_model_path == "" and config.reward.reward_batch_size == 8
    config.reward.reward_model_path, config.reward.reward_batch_size = str(path), 2
    options = {k: v for k, v in config.reward.items() if k != "name"}
    reward_fn = make_reward_fn("reward_model", device="cpu", **options)
    scores = reward_fn(RESPONSES + ["1"], PROMPTS + ["1+1="])
    assert [len(batch) for batch in recorded_inputs] == [2, 2, 1] and scores.shape == (5,)
    with pytest.raises(RewardSetupError, match="reward_batch_size"):
        make_reward_fn("reward_model", reward_model_path=str(path), reward_batch_size=0)


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
