"""The token-level text policy: sampling equals `generate`, re-scoring equals sampling, KL, save/load, the tiny LM."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO, save_tiny_causal_lm
from ml_collections import ConfigDict
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from rebel_diffusion.policies import make_policy
from rebel_diffusion.policies.causal_lm import CausalLMPolicy
from rebel_diffusion.rewards import make_reward_fn
from rebel_diffusion.trainer import step_loss_gradients
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


def rescoring_tolerance(policy: CausalLMPolicy, trajectory: Trajectory) -> float:
    """How far stored log-probs (from `generate`'s KV-cached logits) may be from a full re-scoring forward in fp32.

    The two paths compute each logit z with different summation orders, so they differ by a few ulps of M = max |z|;
    log_softmax(z / T)_i = z_i / T - logsumexp(z / T) then moves by at most twice that over T. Its own rounding adds a
    few ulps of the values it handles, which are at most S = 2 M / T + log V in magnitude. Both are bounded by
    k * eps * S with eps = 2^-23 (fp32 ulp of 1) and k = 8 ulps.
    """
    with torch.no_grad():
        logits = policy.network(input_ids=torch.cat([trajectory.states, trajectory.actions], dim=1),
                                attention_mask=torch.cat([trajectory.conditioning, trajectory.mask.long()], dim=1)).logits
    magnitude = 2 * logits.abs().max().item() / policy.temperature + math.log(logits.shape[-1])
    return 8 * 2.0**-23 * magnitude


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
    # From generate's own logits (the same ops on the same numbers), not from another forward; 0 after the EOS.
    torch.testing.assert_close(trajectory.log_probs, generate_log_probs, atol=0, rtol=0)
    assert (trajectory.log_probs[~trajectory.mask] == 0).all() and (~trajectory.mask).any()
    assert trajectory.kl is None
    # Re-scoring reproduces them within fp32 rounding.
    rescored, _ = policy.log_prob(trajectory, range(0, MAX_NEW_TOKENS))
    torch.testing.assert_close(rescored, trajectory.log_probs, atol=rescoring_tolerance(policy, trajectory), rtol=0)


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
    torch.testing.assert_close(log_probs, batch.log_probs, atol=rescoring_tolerance(policy, batch), rtol=0)
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
                               atol=rescoring_tolerance(policy, trajectory), rtol=0)


def test_kl_reference_is_the_base_model(tiny_causal_lm_path: Path) -> None:
    policy = make_policy_from(tiny_causal_lm_path, kl_estimator="k1")
    perturb_lora(policy)
    torch.manual_seed(5)
    trajectory = policy.sample(PROMPTS, with_kl=True)
    base = AutoModelForCausalLM.from_pretrained(tiny_causal_lm_path)
    tolerance = rescoring_tolerance(policy, trajectory)
    for row in range(len(trajectory)):
        expected = trajectory.log_probs[row][trajectory.mask[row]] - reference_log_probs(base, trajectory, row)
        torch.testing.assert_close(trajectory.kl[row][trajectory.mask[row]], expected, atol=tolerance, rtol=0)
    assert (trajectory.kl[~trajectory.mask] == 0).all()
    assert trajectory.kl.abs().max() > 1e-3
    torch.testing.assert_close(policy.kl(trajectory), trajectory.kl, atol=tolerance, rtol=0)
    _, kl = policy.log_prob(trajectory, range(0, MAX_NEW_TOKENS), with_kl=True)
    torch.testing.assert_close(kl, trajectory.kl, atol=tolerance, rtol=0)
    assert kl.requires_grad
    # The reward-shaping penalty of sampling is k1 whatever the estimator; kl() follows the estimator.
    policy.kl_estimator = "exact"
    torch.manual_seed(5)
    again = policy.sample(PROMPTS, with_kl=True)
    torch.testing.assert_close(again.kl, trajectory.kl, atol=0, rtol=0)
    exact = policy.kl(trajectory)
    assert (exact[~trajectory.mask] == 0).all() and (exact[trajectory.mask] >= 0).all()


def one_token_setup(path: Path) -> tuple[CausalLMPolicy, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """A one-token-response policy with a substantial adapter, its prompts' ids, and each prompt's true KL `(B,)` and
    the true KL's tempered vocab distributions, computed independently: unpadded forwards of the peft network (the
    policy, with grad) and of a separately loaded base model (the reference), then plain torch over the vocabulary."""
    policy = make_policy_from(path, max_new_tokens=1)
    perturb_lora(policy)
    base = AutoModelForCausalLM.from_pretrained(path).eval()
    prompts = [policy.tokenizer(p, return_tensors="pt")["input_ids"][0] for p in PROMPTS[:3]]
    true_kl, pis = [], []
    for ids in prompts:
        logits = policy.network(input_ids=ids[None]).logits[0, -1].double() / TEMPERATURE
        with torch.no_grad():
            ref_logits = base(input_ids=ids[None]).logits[0, -1].double() / TEMPERATURE
        p, log_p, log_q = torch.softmax(logits, -1), torch.log_softmax(logits, -1), torch.log_softmax(ref_logits, -1)
        true_kl.append((p * (log_p - log_q)).sum())
        pis.append(p.detach())
    return policy, prompts, torch.stack(true_kl), pis


def one_token_trajectory(policy: CausalLMPolicy, prompt_ids: list[torch.Tensor], actions: list[int]) -> Trajectory:
    """Prompts (left-padded) each followed by one given response token."""
    width = max(len(ids) for ids in prompt_ids)
    pad = policy.tokenizer.pad_token_id
    states = torch.stack([torch.cat([torch.full((width - len(ids),), pad), ids]) for ids in prompt_ids])
    conditioning = torch.stack([torch.arange(width) >= width - len(ids) for ids in prompt_ids]).long()
    actions = torch.tensor(actions)[:, None]
    return Trajectory(prompts=["?"] * len(prompt_ids), states=states, actions=actions, outputs=None,
                      log_probs=torch.zeros(actions.shape), mask=torch.ones(actions.shape, dtype=torch.bool),
                      conditioning=conditioning)


def trainer_kl_gradient(policy: CausalLMPolicy, batch: Trajectory, kl_coef: float) -> torch.Tensor:
    """The flattened gradient `step_loss_gradients` accumulates from the KL term alone (a zero algorithm loss)."""
    accelerator = SimpleNamespace(backward=lambda loss: loss.backward())
    algorithm = SimpleNamespace(kl_in_reward=False, step_reduction="mean",
                                step_loss=lambda log_prob, *_: (torch.zeros_like(log_prob), {}))
    for p in policy.trainable_parameters():
        p.grad = None
    step_loss_gradients(accelerator, policy, algorithm, batch, torch.zeros(len(batch)), ConfigDict({"kl_coef": kl_coef}),
                        0)
    return torch.cat([p.grad.flatten() for p in policy.trainable_parameters()])


def test_exact_kl_gradient_is_the_true_kl_gradient(tiny_causal_lm_path: Path) -> None:
    policy, prompts, true_kl, pis = one_token_setup(tiny_causal_lm_path)
    assert true_kl.min() > 0.01  # the adapter moved the policy well away from the reference
    params = policy.trainable_parameters()
    kl_coef = 0.5
    vocab = pis[0].shape[0]

    # kl() and the per-token exact KL of log_prob against the enumeration, for any sampled token.
    batch = one_token_trajectory(policy, prompts, [3, 7, 11])
    _, kl = policy.log_prob(batch, range(0, 1), with_kl=True)
    torch.testing.assert_close(kl[:, 0].double(), true_kl.detach(), atol=0, rtol=1e-5)
    torch.testing.assert_close(policy.kl(batch)[:, 0].double(), true_kl.detach(), atol=0, rtol=1e-5)

    # The gradient of the trainer's KL term (mean over the batch's tokens) is kl_coef * grad of the mean true KL.
    true_grad = torch.cat([g.flatten() for g in torch.autograd.grad(kl_coef * true_kl.mean(), params,
                                                                    retain_graph=True)]).float()
    grad = trainer_kl_gradient(policy, batch, kl_coef)
    assert (grad - true_grad).norm() <= 1e-5 * true_grad.norm()

    # In expectation over the sampled token (every token of the first prompt, weighted by its probability): the exact
    # term's expected gradient is the true one; k1's (the old loss term) is zero, for sum_a pi(a) grad log pi(a) = 0.
    true_grad_0 = torch.cat([g.flatten() for g in torch.autograd.grad(kl_coef * true_kl[0], params)]).float()
    expected = {}
    for estimator in ("exact", "k1"):
        policy.kl_estimator = estimator
        expected[estimator] = sum(pis[0][a].item() * trainer_kl_gradient(
            policy, one_token_trajectory(policy, prompts[:1], [a]), kl_coef) for a in range(vocab))
    assert (expected["exact"] - true_grad_0).norm() <= 1e-5 * true_grad_0.norm()
    assert expected["k1"].norm() <= 1e-4 * true_grad_0.norm()

    # k1 and k3 are unbiased for the KL's value; their mean over the enumerated tokens is the true KL.
    everything = one_token_trajectory(policy, prompts[:1] * vocab, list(range(vocab)))
    for estimator in ("k1", "k3"):
        policy.kl_estimator = estimator
        mean = (pis[0] * policy.kl(everything)[:, 0].double()).sum()
        torch.testing.assert_close(mean, true_kl[0].detach(), atol=0, rtol=1e-5)


def test_bad_kl_estimator_and_lora_init(tiny_causal_lm_path: Path) -> None:
    with pytest.raises(ValueError, match="model.kl_estimator"):
        make_policy_from(tiny_causal_lm_path, kl_estimator="k2")
    with pytest.raises(ValueError, match="lora.init"):
        make_policy_from(tiny_causal_lm_path, lora_init="pissa")
    config = ConfigDict({"model": {"kl_estimator": "exact"}, "lora": {"init": "gaussian"}})
    CausalLMPolicy.check_config(config)
    config.model.kl_estimator = "K3"
    with pytest.raises(ValueError, match="model.kl_estimator"):
        CausalLMPolicy.check_config(config)
    config.model.kl_estimator, config.lora.init = "k3", "loftq"
    with pytest.raises(ValueError, match="lora.init"):
        CausalLMPolicy.check_config(config)
    # The trainer checks them before loading anything: a one-line ConfigError (exit 2) naming the key.
    from configs.quickstart_text_rebel import get_config as text_quickstart
    from rebel_diffusion.trainer import ConfigError, validate_config

    for key, value in [("model.kl_estimator", "kl"), ("lora.init", "pissa")]:
        config = text_quickstart()
        config.model.pretrained = str(TINY_LM)
        config.prompt_file = str(REPO / "assets" / "addition_train_prompts.txt")
        config.eval.prompt_file = ""
        section, name = key.split(".")
        config[section][name] = value
        with pytest.raises(ConfigError, match=key.replace(".", "\\.")):
            validate_config(config)


def test_lora_init_takes_effect(tiny_causal_lm_path: Path) -> None:
    def weights(policy: CausalLMPolicy, which: str) -> torch.Tensor:
        return torch.cat([p.flatten() for n, p in policy.model.named_parameters() if f"lora_{which}" in n])

    rank = 8
    torch.manual_seed(0)
    gaussian = make_policy_from(tiny_causal_lm_path, lora_rank=rank, lora_init="gaussian")
    torch.manual_seed(0)
    default = make_policy_from(tiny_causal_lm_path, lora_rank=rank, lora_init="default")
    assert gaussian.model.peft_config["default"].init_lora_weights == "gaussian"
    assert default.model.peft_config["default"].init_lora_weights is True
    # gaussian: A ~ N(0, 1/r); peft's default: Kaiming-uniform A, bounded by 1/sqrt(fan_in) (fan_in >= 32 here).
    assert abs(weights(gaussian, "A").std().item() - 1 / rank) < 0.01
    assert weights(default, "A").abs().max() <= 1 / math.sqrt(32)
    assert (weights(gaussian, "B") == 0).all() and (weights(default, "B") == 0).all()
    # "false": random B, so the policy starts away from the reference.
    away = make_policy_from(tiny_causal_lm_path, lora_rank=rank, lora_init="false")
    assert (weights(away, "B") != 0).any()
    torch.manual_seed(0)
    trajectory = away.sample(PROMPTS[:2])
    assert away.kl(trajectory).abs().max() > 0
    config = ConfigDict({"model": {"pretrained": str(tiny_causal_lm_path), "max_new_tokens": 2, "temperature": 0.7,
                                   "top_k": 0, "top_p": 1.0, "chat_template": True, "kl_estimator": "k3"},
                         "lora": {"rank": 4, "alpha": 8, "targets": "", "init": "orthogonal"}})
    policy = CausalLMPolicy.from_config(config, device="cpu", dtype=torch.float32)
    assert policy.model.peft_config["default"].init_lora_weights == "orthogonal" and policy.kl_estimator == "k3"


def test_half_precision_rescores_stored_log_probs(tmp_path: Path) -> None:
    path = save_tiny_causal_lm(tmp_path / "model", "llama")
    policy = CausalLMPolicy.from_pretrained(path, dtype=torch.bfloat16, max_new_tokens=4)
    assert not policy.log_probs_from_generate
    torch.manual_seed(0)
    trajectory = policy.sample(PROMPTS)
    torch.testing.assert_close(policy.log_prob(trajectory, range(0, 4))[0].float(), trajectory.log_probs, atol=0, rtol=0)


def test_lora_save_load_round_trip(tiny_causal_lm_path: Path, tmp_path: Path) -> None:
    policy = make_policy_from(tiny_causal_lm_path)
    perturb_lora(policy)
    torch.manual_seed(0)
    trajectory = policy.sample(PROMPTS)
    policy.save_lora(tmp_path / "lora")

    restored = make_policy_from(tiny_causal_lm_path)
    restored.load_lora(tmp_path / "lora")
    torch.testing.assert_close(restored.log_prob(trajectory, range(0, MAX_NEW_TOKENS))[0], trajectory.log_probs,
                               atol=rescoring_tolerance(policy, trajectory), rtol=0)
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
    torch.testing.assert_close(policy.log_prob(trajectory, range(0, 4))[0], trajectory.log_probs,
                               atol=rescoring_tolerance(policy, trajectory), rtol=0)

    # Mediocre at addition: room for RL (a fixed 200-prompt subset keeps the test fast).
    trajectory = policy.sample(prompts[:200])
    accuracy = make_reward_fn("addition_exact")(trajectory.outputs, trajectory.prompts).mean().item()
    assert 0.25 < accuracy < 0.65
