"""The token-level text policy: sampling equals `generate`, re-scoring equals sampling, KL, save/load, the tiny LM."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, save_tiny_causal_lm
from ml_collections import ConfigDict
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from rebel_diffusion.policies import make_policy
from rebel_diffusion.policies.causal_lm import CausalLMPolicy
from rebel_diffusion.rewards import make_reward_fn
from rebel_diffusion.trajectory import Trajectory

PROMPTS = ["ab", "abc dd", "1+2=", "h", "gg 12", "e"]
TINY_LM = REPO / "assets" / "tiny-lm"
MAX_NEW_TOKENS = 12
TEMPERATURE = 0.7


def make_policy_from(path: Path, **options) -> CausalLMPolicy:
    """A policy on `path` with the tests' sampling settings unless overridden."""
    options = {"max_new_tokens": MAX_NEW_TOKENS, "temperature": TEMPERATURE, **options}
    return CausalLMPolicy.from_pretrained(path, **options)


def perturb_lora(policy: CausalLMPolicy, seed: int = 1) -> None:
    """Give the adapter non-zero weights so the policy differs from the reference."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)


def reference_log_probs(model: torch.nn.Module, trajectory: Trajectory, row: int) -> torch.Tensor:
    """Tempered log-probs of one row's real response tokens, from an unpadded forward: an independent computation."""
    prompt = trajectory.states[row][trajectory.conditioning[row].bool()]
    response = trajectory.actions[row][trajectory.mask[row]]
    logits = model(input_ids=torch.cat([prompt, response])[None]).logits[0, len(prompt) - 1 : -1]
    return torch.log_softmax(logits / TEMPERATURE, dim=-1).gather(-1, response[:, None])[:, 0]


def mixed_seed(policy: CausalLMPolicy) -> int:
    """A seed whose batch has responses that end early and responses that hit the length limit (for a random model,
    which seed does is up to the weights)."""
    for seed in range(50):
        torch.manual_seed(seed)
        truncated = policy.sample(PROMPTS).truncated
        if truncated.any() and not truncated.all():
            return seed
    raise AssertionError("no seed gives a batch with both early-ending and truncated responses")


def test_sample_equals_generate(tiny_causal_lm_path: Path) -> None:
    policy = make_policy_from(tiny_causal_lm_path)
    seed = mixed_seed(policy)
    torch.manual_seed(seed)
    trajectory = policy.sample(PROMPTS)

    model = AutoModelForCausalLM.from_pretrained(tiny_causal_lm_path)
    tokenizer = AutoTokenizer.from_pretrained(tiny_causal_lm_path)
    encoded = tokenizer(PROMPTS, padding=True, padding_side="left", return_tensors="pt")
    torch.manual_seed(seed)
    out = model.generate(
        **encoded, do_sample=True, max_new_tokens=MAX_NEW_TOKENS, temperature=TEMPERATURE, top_k=0, top_p=1.0,
        return_dict_in_generate=True, output_logits=True,
    )
    prompt_length = encoded["input_ids"].shape[1]
    assert torch.equal(trajectory.states, encoded["input_ids"])
    assert torch.equal(trajectory.conditioning, encoded["attention_mask"])
    assert torch.equal(trajectory.actions, out.sequences[:, prompt_length:])
    # Some responses end early, some hit the length limit.
    assert trajectory.truncated.any() and not trajectory.truncated.all()
    eos = tokenizer.eos_token_id
    for row, actions in enumerate(trajectory.actions.tolist()):
        length = actions.index(eos) + 1 if eos in actions else len(actions)
        assert trajectory.mask[row].tolist() == [i < length for i in range(len(actions))]
        assert trajectory.truncated[row].item() == (eos not in actions)
        assert trajectory.outputs[row] == tokenizer.decode(actions[: length - (eos in actions)], skip_special_tokens=True)
    generate_log_probs = torch.log_softmax(torch.stack(out.logits, dim=1) / TEMPERATURE, dim=-1)
    generate_log_probs = generate_log_probs.gather(-1, trajectory.actions[..., None])[..., 0] * trajectory.mask
    assert trajectory.log_probs.dtype == torch.float32
    torch.testing.assert_close(trajectory.log_probs, generate_log_probs, atol=1e-5, rtol=0)
    assert trajectory.kl is None


def test_log_prob_reproduces_stored_after_cat(tiny_causal_lm_path: Path) -> None:
    policy = make_policy_from(tiny_causal_lm_path)
    perturb_lora(policy)
    torch.manual_seed(0)
    first = policy.sample(PROMPTS[:3])
    policy.max_new_tokens = 5  # a shorter second batch, with shorter prompts
    second = policy.sample(["a", "b"])
    policy.max_new_tokens = MAX_NEW_TOKENS
    assert first.actions.shape[1] != second.actions.shape[1] and first.states.shape[1] != second.states.shape[1]
    batch = Trajectory.cat([first, second])

    log_probs, kl = policy.log_prob(batch, policy.step_chunks()[0])
    assert kl is None and log_probs.requires_grad
    torch.testing.assert_close(log_probs, batch.log_probs, atol=1e-5, rtol=0)
    for row in range(len(batch)):
        expected = reference_log_probs(policy.model, batch, row)
        torch.testing.assert_close(log_probs[row][batch.mask[row]], expected, atol=1e-5, rtol=0)
    # A chunk of steps is the matching slice.
    part, _ = policy.log_prob(batch, range(2, 4))
    torch.testing.assert_close(part, log_probs[:, 2:4])
    # Gradients reach the adapter only.
    log_probs.sum().backward()
    assert all(p.grad is not None for p in policy.trainable_parameters())
    assert all("lora_" in n for n, p in policy.model.named_parameters() if p.requires_grad)


def test_mask_when_pad_is_eos(tmp_path: Path) -> None:
    path = save_tiny_causal_lm(tmp_path / "model", "llama", pad=False)
    with pytest.warns(UserWarning, match="no pad token"):
        policy = make_policy_from(path)
    eos = policy.tokenizer.eos_token_id
    assert policy.tokenizer.pad_token_id == eos
    torch.manual_seed(mixed_seed(policy))
    trajectory = policy.sample(PROMPTS)
    assert trajectory.truncated.any() and not trajectory.truncated.all()
    for row, actions in enumerate(trajectory.actions.tolist()):
        if eos in actions:
            first = actions.index(eos)
            assert all(a == eos for a in actions[first:])  # generate pads with EOS after the end
            assert trajectory.mask[row].sum().item() == first + 1
    torch.testing.assert_close(policy.log_prob(trajectory, range(0, MAX_NEW_TOKENS))[0], trajectory.log_probs,
                               atol=1e-5, rtol=0)


def test_kl_reference_is_the_base_model(tiny_causal_lm_path: Path) -> None:
    policy = make_policy_from(tiny_causal_lm_path)
    perturb_lora(policy)
    torch.manual_seed(5)
    trajectory = policy.sample(PROMPTS, with_kl=True)
    base = AutoModelForCausalLM.from_pretrained(tiny_causal_lm_path)
    for row in range(len(trajectory)):
        expected = trajectory.log_probs[row][trajectory.mask[row]] - reference_log_probs(base, trajectory, row)
        torch.testing.assert_close(trajectory.kl[row][trajectory.mask[row]], expected, atol=1e-5, rtol=0)
    assert (trajectory.kl[~trajectory.mask] == 0).all()
    assert trajectory.kl.abs().max() > 1e-3
    torch.testing.assert_close(policy.kl(trajectory), trajectory.kl, atol=1e-6, rtol=0)
    _, kl = policy.log_prob(trajectory, range(0, MAX_NEW_TOKENS), with_kl=True)
    torch.testing.assert_close(kl, trajectory.kl, atol=1e-6, rtol=0)
    assert kl.requires_grad


def test_lora_save_load_round_trip(tiny_causal_lm_path: Path, tmp_path: Path) -> None:
    policy = make_policy_from(tiny_causal_lm_path)
    perturb_lora(policy)
    torch.manual_seed(0)
    trajectory = policy.sample(PROMPTS)
    policy.save_lora(tmp_path / "lora")

    restored = make_policy_from(tiny_causal_lm_path)
    restored.load_lora(tmp_path / "lora")
    torch.testing.assert_close(restored.log_prob(trajectory, range(0, MAX_NEW_TOKENS))[0], trajectory.log_probs,
                               atol=1e-5, rtol=0)
    # Users load the adapter with peft.
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_causal_lm_path), tmp_path / "lora")
    ids = torch.cat([trajectory.states[:1], trajectory.actions[:1]], dim=1)
    torch.testing.assert_close(peft_model(input_ids=ids).logits, policy.model(input_ids=ids).logits)

    with pytest.raises(ValueError, match="rank"):
        make_policy_from(tiny_causal_lm_path, lora_rank=4).load_lora(tmp_path / "lora")
    with pytest.raises(ValueError, match="no peft adapter"):
        restored.load_lora(tmp_path)


def test_full_weights_without_lora(tiny_causal_lm_path: Path, tmp_path: Path) -> None:
    policy = make_policy_from(tiny_causal_lm_path, lora_rank=0)
    assert len(policy.trainable_parameters()) == len(list(policy.model.parameters()))
    torch.manual_seed(0)
    trajectory = policy.sample(PROMPTS)
    with pytest.raises(ValueError, match="lora_rank"):
        policy.kl(trajectory)
    with pytest.raises(ValueError, match="lora_rank"):
        policy.sample(PROMPTS, with_kl=True)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.01)
    policy.save_lora(tmp_path / "full")
    assert AutoTokenizer.from_pretrained(tmp_path / "full") is not None
    restored = make_policy_from(tiny_causal_lm_path, lora_rank=0)
    restored.load_lora(tmp_path / "full")
    torch.testing.assert_close(restored.log_prob(trajectory, range(0, MAX_NEW_TOKENS))[0],
                               policy.log_prob(trajectory, range(0, MAX_NEW_TOKENS))[0])


def test_generator_leaves_global_rng_alone(tiny_causal_lm_path: Path, tmp_path: Path) -> None:
    policy = make_policy_from(tiny_causal_lm_path)
    torch.manual_seed(11)
    state = torch.get_rng_state()
    a = policy.sample(PROMPTS, generator=torch.Generator().manual_seed(7))
    b = policy.sample(PROMPTS, generator=torch.Generator().manual_seed(7))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.actions, b.actions)
    policy.save_samples(PROMPTS[:2], [7, 8], tmp_path / "samples")
    lines = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [(line["prompt"], line["seed"]) for line in lines] == [(p, s) for s in (7, 8) for p in PROMPTS[:2]]
    expected = policy.sample(PROMPTS[:2], generator=torch.Generator().manual_seed(8)).outputs
    assert [line["response"] for line in lines[2:]] == expected


def test_chat_template(tmp_path: Path) -> None:
    template = (
        "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}={% endif %}"
    )
    path = save_tiny_causal_lm(tmp_path / "chat", "gpt2", chat_template=template)
    policy = make_policy_from(path)
    assert policy.format_prompts(["12+3"]) == ["<bos>12+3="]
    ids, _ = policy.tokenize_prompts(["12+3"])
    assert ids[0].tolist() == policy.tokenizer("12+3=")["input_ids"]  # one BOS, from the template
    assert make_policy_from(path, chat_template=False).format_prompts(["12+3"]) == ["12+3"]


def test_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="neither an existing folder"):
        CausalLMPolicy.from_pretrained(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="cannot load model"):
        CausalLMPolicy.from_pretrained(tmp_path / "empty")


def test_from_config_on_the_shipped_tiny_lm() -> None:
    config = ConfigDict({
        "policy": "causal_lm",
        "model": {"pretrained": str(TINY_LM), "max_new_tokens": 4, "temperature": 0.7, "top_k": 0, "top_p": 1.0,
                  "chat_template": True},
        "lora": {"rank": 4, "alpha": 8, "targets": "q_proj, v_proj"},
    })
    policy = make_policy(config, device=torch.device("cpu"), dtype=torch.float32)
    assert isinstance(policy, CausalLMPolicy) and policy.num_actions == 4 and policy.step_chunks() == [range(0, 4)]
    lora_modules = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, _ in policy.model.named_parameters() if "lora_" in n}
    assert lora_modules == {"q_proj", "v_proj"}

    prompts = (REPO / "assets" / "addition_train_prompts.txt").read_text().split()
    policy.sample(prompts[:32])  # warm-up
    torch.manual_seed(0)
    start = time.perf_counter()
    trajectory = policy.sample(prompts[:32])
    assert time.perf_counter() - start < 1.0
    torch.testing.assert_close(policy.log_prob(trajectory, range(0, 4))[0], trajectory.log_probs, atol=1e-5, rtol=0)

    # Mediocre at addition: room for RL (a fixed 200-prompt subset keeps the test fast).
    trajectory = policy.sample(prompts[:200])
    accuracy = make_reward_fn("addition_exact")(trajectory.outputs, trajectory.prompts).mean().item()
    assert 0.25 < accuracy < 0.65
