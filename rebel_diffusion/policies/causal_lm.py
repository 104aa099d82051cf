"""A causal language model as a token-level policy.

Each generated token is one action: the state is the prompt plus the tokens so far, and the action distribution is the
model's next-token softmax at the sampling temperature. A trajectory holds the left-padded prompt ids (`states`), the
prompt attention mask (`conditioning`) and the response ids (`actions`); `mask` marks the response tokens up to and
including the first EOS. The policy is a peft LoRA adapter on the model (or all weights with `lora_rank=0`); the
reference for the KL is the same network with the adapter disabled, so no second copy is held.

Log-probabilities are those of the tempered softmax `log_softmax(logits / temperature)`; top-k/top-p truncation, when
enabled, shapes which tokens are drawn but is not part of the density, as in common RLHF practice. The KL to the
reference is taken between the same tempered, untruncated distributions (see `KL_ESTIMATORS`): the truncated ones
would give an infinite KL wherever the policy keeps a token the reference's own truncation drops.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
from ml_collections import ConfigDict
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from rebel_diffusion.policies import same_prompt_pairs
from rebel_diffusion.trajectory import Trajectory

DEFAULT_LORA_TARGETS = "all-linear"

# Per-token KL(pi_theta(.|s_t) || pi_ref(.|s_t)) for the loss term and `kl()`, with p = softmax(logits / temperature):
# - "exact": sum over the vocabulary of p_theta * (log p_theta - log p_ref), from the logits both forwards compute anyway.
#   Its gradient is the gradient of the KL at the visited states.
# - "k1": log p_theta(a_t) - log p_ref(a_t) at the sampled token. Unbiased for the KL's value, but the expectation of its
#   gradient over a_t ~ p_theta is sum_a p_theta grad log p_theta = 0: as a loss term it adds noise only.
# - "k3": (r - 1) - log r with r = p_ref(a_t) / p_theta(a_t) (Schulman's estimator, TRL's choice): unbiased, >= 0, low
#   variance; its expected gradient is that of the reverse KL(pi_ref || pi_theta).
KL_ESTIMATORS = ("exact", "k1", "k3")

# `lora.init` -> peft's `init_lora_weights`. Only inits that leave the base weights alone are offered: the reference is
# the network with the adapter disabled, so "pissa"/"olora"/"corda"/"loftq" (which rewrite the base weights) would move
# the reference, and "eva"/"lora_ga" need a data pass. "gaussian", "default" (peft's True: Kaiming-uniform A) and
# "orthogonal" (even rank) start at B @ A = 0, i.e. at the reference; "false" (random B) starts away from it.
LORA_INITS: dict[str, str | bool] = {"gaussian": "gaussian", "default": True, "true": True, "orthogonal": "orthogonal",
                                     "false": False}


def lora_init_value(init: str | bool) -> str | bool:
    """peft's `init_lora_weights` for a `lora.init` value; `ValueError` naming the key for any other."""
    key = str(init).strip().lower()
    if key not in LORA_INITS:
        raise ValueError(f"lora.init must be one of {list(LORA_INITS)} for the text policy, got {init!r}")
    return LORA_INITS[key]


def check_kl_estimator(kl_estimator: str) -> None:
    """`ValueError` naming the key unless `kl_estimator` is one of `KL_ESTIMATORS`."""
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"model.kl_estimator must be one of {list(KL_ESTIMATORS)}, got {kl_estimator!r}")


def kl_terms(log_probs: torch.Tensor, ref_log_probs: torch.Tensor, actions: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token KL `(B, T)` from tempered log-probs over the vocabulary `(B, T, V)` of the policy and the reference and
    the taken tokens `(B, T)`; gradients flow through whichever inputs carry them."""
    if estimator == "exact":
        probs = log_probs.exp()  # tokens the policy gives probability 0 (masked to -inf) add 0, not 0 * nan
        return torch.where(probs > 0, probs * (log_probs - ref_log_probs), 0.0).sum(dim=-1)
    taken = log_probs.gather(-1, actions.unsqueeze(-1)).squeeze(-1)
    ref_taken = ref_log_probs.gather(-1, actions.unsqueeze(-1)).squeeze(-1)
    if estimator == "k1":
        return taken - ref_taken
    log_ratio = ref_taken - taken  # log r, r = pi_ref / pi_theta
    return torch.expm1(log_ratio) - log_ratio


class CausalLMPolicy:
    """A `transformers` causal LM (with an optional LoRA adapter) that samples responses and re-scores their tokens.

    Args:
        model: any `AutoModelForCausalLM` model.
        tokenizer: its tokenizer; without a pad token, EOS pads.
        max_new_tokens: the longest response, T.
        temperature, top_k, top_p: sampling settings (`top_k=0` and `top_p=1.0` are off).
        lora_rank, lora_alpha, lora_targets: the peft LoRA adapter; `lora_rank=0` trains all weights instead, and then
            there is no reference model (asking for a KL raises `ValueError`) because keeping a frozen copy would
            double the memory.
        lora_init: `lora.init`, see `LORA_INITS`.
        kl_estimator: the per-token KL of `log_prob(with_kl=True)` and `kl()`, one of `KL_ESTIMATORS`.
        chat_template: format prompts with the tokenizer's chat template (when it has one) as a user turn.
        device: where the model runs (default: where it already is).
    """

    kind = "text"
    # reward.missing_eos_penalty: the trainer applies it to `Trajectory.truncated`, which only a text policy fills.
    config_keys = frozenset({
        "model.pretrained", "model.max_new_tokens", "model.temperature", "model.top_k", "model.top_p",
        "model.chat_template", "model.kl_estimator", "lora.rank", "lora.alpha", "lora.init", "lora.targets",
        "reward.missing_eos_penalty",
    })

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        max_new_tokens: int = 53,
        temperature: float = 0.7,
        top_k: int = 0,
        top_p: float = 1.0,
        lora_rank: int = 8,
        lora_alpha: float = 16,
        lora_targets: str | list[str] = DEFAULT_LORA_TARGETS,
        lora_init: str | bool = "gaussian",
        kl_estimator: str = "exact",
        chat_template: bool = True,
        device: torch.device | str | None = None,
    ) -> None:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive (sampling), got {temperature}")
        if lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0, got {lora_rank}")
        check_kl_estimator(kl_estimator)
        init_lora_weights = lora_init_value(lora_init)
        self.tokenizer = tokenizer
        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token_id is None:
                raise ValueError("the tokenizer has neither a pad nor an EOS token")
            warnings.warn("the tokenizer has no pad token; using its EOS token to pad", stacklevel=2)
            tokenizer.pad_token = tokenizer.eos_token
        self.eos_token_ids = _eos_ids(model, tokenizer)
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_k = top_k
        self.top_p = top_p
        self.lora_rank = lora_rank
        self.kl_estimator = kl_estimator
        self.use_chat_template = chat_template and getattr(tokenizer, "chat_template", None) is not None
        self.device = torch.device(device) if device is not None else model.device

        model.to(self.device)
        # Stored log-probs come from `generate`'s own logits when the network computes in float32: they then equal a
        # re-scoring forward up to fp32 rounding. In half precision the KV-cached and the full forward differ by bf16/fp16
        # rounding (~1e-2 in a log-prob), more than a tight PPO clip range, so there the stored log-probs are re-scored.
        self.log_probs_from_generate = all(p.dtype == torch.float32 for p in model.parameters())
        if lora_rank > 0:
            model.requires_grad_(False)
            lora = LoraConfig(r=lora_rank, lora_alpha=lora_alpha, target_modules=lora_targets, task_type="CAUSAL_LM",
                              init_lora_weights=init_lora_weights)
            model = get_peft_model(model, lora)
            # peft keeps adapters in float32 (autocast_adapter_dtype) even on a half-precision base.
        # Sampling and re-scoring must see the same network: dropout would make stored and recomputed log-probs differ.
        model.eval()
        # The unwrapped network: the trainer may replace `self.model` by a wrapper that lacks `disable_adapter`.
        self.network = model
        self.model: torch.nn.Module = model

    @classmethod
    def from_pretrained(
        cls,
        model_id_or_path: str,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        **options: Any,
    ) -> CausalLMPolicy:
        """Load an `AutoModelForCausalLM` and its tokenizer (a Hub id or a local folder); `options` as in __init__."""
        path = str(model_id_or_path)
        local = Path(path).expanduser()
        if not local.exists() and (path.startswith((".", "/", "~")) or path.count("/") != 1):
            raise FileNotFoundError(f"model {path!r} is neither an existing folder nor a Hugging Face Hub id (owner/name)")
        source = str(local) if local.exists() else path
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        except (OSError, ValueError, KeyError) as e:
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise FileNotFoundError(f"cannot load model {path!r}: {first_line}") from e
        return cls(model, tokenizer, device=device, **options)

    @classmethod
    def from_config(cls, config: ConfigDict, device: torch.device | str | None, dtype: torch.dtype) -> CausalLMPolicy:
        """Build from `config.model` (pretrained, max_new_tokens, temperature, top_k, top_p, chat_template,
        kl_estimator) and `config.lora` (rank, alpha, init, targets: "" for all linear layers, else a comma-separated list
        of module names)."""
        cls.check_config(config)
        targets = config.lora.targets.strip()
        return cls.from_pretrained(
            config.model.pretrained,
            device=device,
            dtype=dtype,
            max_new_tokens=config.model.max_new_tokens,
            temperature=config.model.temperature,
            top_k=config.model.top_k,
            top_p=config.model.top_p,
            chat_template=config.model.chat_template,
            lora_rank=config.lora.rank,
            lora_alpha=config.lora.alpha,
            lora_targets=[t.strip() for t in targets.split(",") if t.strip()] if targets else DEFAULT_LORA_TARGETS,
            lora_init=config.lora.get("init", "gaussian"),
            kl_estimator=config.model.get("kl_estimator", "exact"),
        )

    @staticmethod
    def check_config(config: ConfigDict) -> None:
        """`ValueError` naming the key for a `model.kl_estimator` or `lora.init` this policy does not know (checked
        before any model is loaded)."""
        check_kl_estimator(config.model.get("kl_estimator", "exact"))
        lora_init_value(config.lora.get("init", "gaussian"))

    @property
    def has_reference(self) -> bool:
        """The reference is the model with the adapter disabled; training all weights leaves none."""
        return self.lora_rank > 0

    @property
    def num_actions(self) -> int:
        """T: the most tokens a response has."""
        return self.max_new_tokens

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The LoRA weights, or every weight with `lora_rank=0`."""
        return [p for p in self.network.parameters() if p.requires_grad]

    def step_chunks(self) -> list[range]:
        """All tokens are scored by one forward pass."""
        return [range(0, self.num_actions)]

    def format_prompts(self, prompts: list[str]) -> list[str]:
        """The text the model is conditioned on: each prompt as a user turn of the chat template, when used."""
        if not self.use_chat_template:
            return list(prompts)
        return [
            self.tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
            for p in prompts
        ]

    def tokenize_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded prompt ids and attention mask `(B, P)` on the device."""
        # A chat template already writes the special tokens (BOS) the model expects; adding them again would double them.
        encoded = self.tokenizer(
            self.format_prompts(prompts), padding=True, padding_side="left", return_tensors="pt",
            add_special_tokens=not self.use_chat_template,
        )
        return encoded["input_ids"].to(self.device), encoded["attention_mask"].to(self.device)

    @torch.no_grad()
    def sample(self, prompts: list[str], generator: torch.Generator | None = None, with_kl: bool = False) -> Trajectory:
        """Sample one response per prompt with `model.generate` and record it.

        Tokens are drawn from torch's global RNG, as `generate` does; a `generator` instead seeds a forked RNG with its
        `initial_seed()`, leaving the global (training) RNG untouched.

        Returns:
            A `Trajectory` with `states`/`conditioning` the prompt ids and attention mask `(B, P)`, `actions` the
            response ids `(B, T)` (T <= max_new_tokens), `mask`, `log_probs` (tempered, 0 off the mask), `outputs` the
            decoded responses, `truncated` `(B,)` and, with `with_kl`, `kl` `(B, T)`: the reward-shaping penalty
            `log pi(a_t) - log pi_ref(a_t)` at the drawn tokens (k1, whatever `kl_estimator` is), whose sum is the
            sequence's log-ratio. As a reward only k1 carries the KL's gradient: an exact per-token KL is the same for
            every token drawn at s_t, so a one-token response would feel no penalty at all.
        """
        input_ids, attention_mask = self.tokenize_prompts(prompts)
        with self._rng(generator):
            out = self.network.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                do_sample=True,
                max_new_tokens=self.max_new_tokens,
                temperature=self.temperature,
                top_k=self.top_k,
                top_p=self.top_p,
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=self.eos_token_ids,
                return_dict_in_generate=True,
                output_logits=True,
            )
        actions = out.sequences[:, input_ids.shape[1]:]
        mask, has_eos = self._response_mask(actions)
        trajectory = Trajectory(
            prompts=list(prompts),
            states=input_ids,
            actions=actions,
            log_probs=torch.zeros(actions.shape, dtype=torch.float32, device=self.device),
            mask=mask,
            outputs=self._decode(actions, mask, has_eos),
            conditioning=attention_mask,
            truncated=~has_eos,
        )
        if self.log_probs_from_generate:
            # `output_logits` are the raw logits, before generate's temperature/top-k/top-p warpers: tempered here as
            # re-scoring does. Rows that ended keep getting (padding) logits; the mask zeroes them.
            logits = torch.stack(out.logits, dim=1)
            trajectory.log_probs = self._taken(self._tempered(logits), actions) * mask
        else:
            trajectory.log_probs = self._token_log_probs(trajectory)[0].float()
        if with_kl:
            ref_log_probs = self._taken(self._reference_vocab_log_probs(trajectory), actions)
            trajectory.kl = (trajectory.log_probs - ref_log_probs) * mask
        return trajectory

    def trajectory_of(self, prompts: list[str], responses: list[str]) -> Trajectory:
        """Given responses (offline data) as trajectories of this policy: each tokenized without special tokens and
        ended with EOS, as a sampled response that stopped. Kept whole, even past `max_new_tokens`: cutting it would
        make it another response. `log_probs` are left at 0 for `rescore` to fill; `outputs` are the responses as the
        policy decodes its own, so that a reward sees both the same way.

        Returns:
            A `Trajectory` like `sample`'s: `states`/`conditioning` the prompt ids and mask `(B, P)`, `actions` the
            response ids `(B, T)` right-padded, `mask`, `truncated` all False.
        """
        input_ids, attention_mask = self.tokenize_prompts(prompts)
        ids = [self.tokenizer(r, add_special_tokens=False)["input_ids"] + [self.eos_token_ids[0]] for r in responses]
        longest = max(len(row) for row in ids)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_token_ids[0]
        actions = torch.tensor([row + [pad] * (longest - len(row)) for row in ids], device=self.device)
        mask, has_eos = self._response_mask(actions)
        return Trajectory(
            prompts=list(prompts), states=input_ids, actions=actions,
            log_probs=torch.zeros(actions.shape, dtype=torch.float32, device=self.device), mask=mask,
            outputs=self._decode(actions, mask, has_eos), conditioning=attention_mask, truncated=~has_eos,
        )

    def log_prob(
        self, trajectory: Trajectory, steps: range, with_kl: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Tempered log-probs of the taken tokens at `steps` `(B, len(steps))` under the current weights, with grad;
        with `with_kl` also the per-token KL to the reference by `kl_estimator` (grad through the policy side). 0 where
        `mask` is False."""
        steps = range(steps.start, min(steps.stop, trajectory.actions.shape[1]))
        log_probs, vocab_log_probs = self._token_log_probs(trajectory)
        kl = None
        if with_kl:
            with torch.no_grad():
                ref_log_probs = self._reference_vocab_log_probs(trajectory)
            kl = kl_terms(vocab_log_probs, ref_log_probs, trajectory.actions, self.kl_estimator) * trajectory.mask
        return log_probs[:, steps.start : steps.stop], None if kl is None else kl[:, steps.start : steps.stop]

    @torch.no_grad()
    def kl(self, trajectory: Trajectory) -> torch.Tensor:
        """Per-token KL to the reference by `kl_estimator` `(B, T)`, 0 off the mask."""
        return self.log_prob(trajectory, range(0, trajectory.actions.shape[1]), with_kl=True)[1]

    def _tempered(self, logits: torch.Tensor) -> torch.Tensor:
        """The sampling distribution's log-probs over the vocabulary, in float32: `log_softmax(logits / temperature)`."""
        return torch.log_softmax(logits.float() / self.temperature, dim=-1)

    @staticmethod
    def _taken(vocab_log_probs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """`(B, T, V)` log-probs -> `(B, T)` those of the taken tokens."""
        return vocab_log_probs.gather(-1, actions.unsqueeze(-1)).squeeze(-1)

    def _token_log_probs(self, trajectory: Trajectory) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward over prompt + response -> tempered log-probs of the response tokens `(B, T)` (masked) and over
        the whole vocabulary `(B, T, V)`."""
        actions, mask = trajectory.actions, trajectory.mask
        # `Trajectory.cat` right-pads prompts, which puts padding between prompt and response; moving every prompt's
        # padding to the left (a stable sort keeps the tokens' order) makes the last prompt column a real token again,
        # the one whose logit predicts the first response token.
        order = torch.argsort(trajectory.conditioning.long(), dim=1, stable=True)
        states, conditioning = trajectory.states.gather(1, order), trajectory.conditioning.gather(1, order)
        input_ids = torch.cat([states, actions], dim=1)
        attention_mask = torch.cat([conditioning.long(), mask.long()], dim=1)
        # Positions count only attended tokens, so left padding changes nothing.
        position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
        num_tokens = actions.shape[1]
        # The logit at position i predicts token i + 1: the response needs the T positions before the last one.
        logits = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, logits_to_keep=num_tokens + 1,
            use_cache=False,
        ).logits[:, :-1]
        vocab_log_probs = self._tempered(logits)
        return self._taken(vocab_log_probs, actions) * mask, vocab_log_probs

    def _reference_vocab_log_probs(self, trajectory: Trajectory) -> torch.Tensor:
        """Tempered log-probs `(B, T, V)` under the reference: the same network with the LoRA adapter disabled."""
        if self.lora_rank == 0:
            raise ValueError("a KL to the reference needs a LoRA adapter (lora_rank > 0): with lora_rank=0 there is none")
        with self.network.disable_adapter():
            return self._token_log_probs(trajectory)[1]

    def _response_mask(self, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`mask` `(B, T)` True up to and including the first EOS, and `(B,)` whether there is an EOS.

        Found from positions, not by comparing to the pad id: the pad token may be the EOS token.
        """
        is_eos = torch.isin(actions, torch.tensor(self.eos_token_ids, device=actions.device))
        has_eos = is_eos.any(dim=1)
        # The index of the first EOS, or T when none.
        first_eos = torch.where(has_eos, is_eos.int().argmax(dim=1), actions.shape[1])
        positions = torch.arange(actions.shape[1], device=actions.device)
        return positions.unsqueeze(0) <= first_eos.unsqueeze(1), has_eos

    def _decode(self, actions: torch.Tensor, mask: torch.Tensor, has_eos: torch.Tensor) -> list[str]:
        """The responses as text, without the EOS and the padding after it."""
        lengths = mask.sum(dim=1) - has_eos.long()
        return [
            self.tokenizer.decode(row[:length].tolist(), skip_special_tokens=True)
            for row, length in zip(actions, lengths.tolist())
        ]

    @contextlib.contextmanager
    def _rng(self, generator: torch.Generator | None) -> Iterator[None]:
        """Sample from the global RNG, or from a forked one seeded by `generator` (the global state is restored)."""
        if generator is None:
            yield
            return
        # The CPU RNG is always forked; a CUDA device's RNG too when sampling there.
        # Only the forked generators are seeded (`torch.manual_seed` would also seed every other device, unrestored,
        # and costs ~0.1 ms, about 1% of a small batch's sampling).
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.default_generator.manual_seed(generator.initial_seed())
            if self.device.type == "cuda":
                with torch.cuda.device(self.device):
                    torch.cuda.manual_seed(generator.initial_seed())
            yield

    def save_lora(self, directory: str | Path) -> None:
        """Write the adapter with peft's `save_pretrained` (load it with `PeftModel.from_pretrained(base, directory)`),
        or, with `lora_rank=0`, the whole model and tokenizer (`AutoModelForCausalLM.from_pretrained(directory)`)."""
        self.network.save_pretrained(directory)
        if self.lora_rank == 0:
            self.tokenizer.save_pretrained(directory)

    def load_lora(self, directory: str | Path) -> None:
        """Load weights written by `save_lora` into this policy; `ValueError` when they do not fit it."""
        directory = Path(directory)
        if self.lora_rank == 0:
            self._load_full_weights(directory)
        else:
            self._load_adapter(directory)

    def _load_adapter(self, directory: Path) -> None:
        """Copy a peft adapter folder's weights into this policy's adapter."""
        weights = directory / "adapter_model.safetensors"
        config_file = directory / "adapter_config.json"
        if not weights.exists() or not config_file.exists():
            raise ValueError(f"{directory} holds no peft adapter (adapter_config.json + adapter_model.safetensors)")
        saved = json.loads(config_file.read_text())
        current = self.network.peft_config["default"]
        if saved.get("r") != current.r:
            raise ValueError(f"the adapter in {directory} has rank {saved.get('r')}, this policy's has rank {current.r}")
        # safetensors takes "cpu" but not "cpu:0", the device of a CPU process under a multi-process launch.
        state = load_file(str(weights), device="cpu" if self.device.type == "cpu" else str(self.device))
        try:
            result = set_peft_model_state_dict(self.network, state)
        except RuntimeError as e:
            raise ValueError(f"the adapter in {directory} does not fit this model: {str(e).splitlines()[0]}") from None
        expected = set(get_peft_model_state_dict(self.network))
        if result.unexpected_keys or not expected <= set(state):
            raise ValueError(f"the adapter in {directory} does not fit this model (its LoRA layers differ)")

    def _load_full_weights(self, directory: Path) -> None:
        """Copy a full model folder's weights into this policy's model."""
        try:
            loaded = AutoModelForCausalLM.from_pretrained(str(directory), dtype=self.network.dtype)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot load weights from {directory}: {str(e).strip().splitlines()[0]}") from None
        try:
            self.network.load_state_dict(loaded.state_dict())
        except RuntimeError as e:
            raise ValueError(f"the weights in {directory} do not fit this model: {str(e).splitlines()[0]}") from None

    def save_samples(self, prompts: list[str], seeds: list[int], path: Path | None) -> None:
        """Write `path.jsonl`: one line `{"prompt", "seed", "response"}` per prompt and seed; with `path` None, sample
        the same without writing (every process makes the same calls, one writes)."""
        outputs = [self.sample(prompts, generator=torch.Generator().manual_seed(seed)).outputs for seed in seeds]
        if path is not None:
            self.write_outputs(prompts, outputs, path, seeds)

    def write_outputs(self, prompts: list[str], outputs_by_seed: list[list[str]], path: Path,
                      seeds: list[int] | None = None) -> None:
        """`path.jsonl`: one line `{"prompt", "seed", "response"}` per prompt and seed (seeds numbered from 0 when
        not given)."""
        seeds = seeds if seeds is not None else list(range(len(outputs_by_seed)))
        lines = [json.dumps({"prompt": p, "seed": seed, "response": r})
                 for seed, outputs in zip(seeds, outputs_by_seed) for p, r in zip(prompts, outputs)]
        Path(path).with_suffix(".jsonl").write_text("\n".join(lines) + "\n")

    def diversity(self, outputs: list[str], prompts: list[str]) -> float:
        """The fraction of pairs of same-prompt responses that differ (exact string comparison): 0 when every prompt
        gets one response, 1 when all differ; NaN without such a pair."""
        first, second = same_prompt_pairs(prompts)
        if not first:
            return float("nan")
        return sum(outputs[a] != outputs[b] for a, b in zip(first, second)) / len(first)

    def check_prompts(self, prompts: list[str]) -> None:
        """Every prompt must leave room for `max_new_tokens` in the model's context."""
        context = getattr(self.network.config, "max_position_embeddings", None) or self.tokenizer.model_max_length
        for prompt in dict.fromkeys(prompts):
            length = len(self.tokenize_prompts([prompt])[0][0])
            if length > context - self.max_new_tokens:
                raise ValueError(f"prompt {prompt[:60]!r} has {length} tokens; the model's context of {context} minus "
                                 f"max_new_tokens={self.max_new_tokens} leaves room for {context - self.max_new_tokens}")


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The token ids that end a response: the generation config's EOS ids, else the tokenizer's."""
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("neither the model's generation config nor the tokenizer defines an EOS token")
    return [eos] if isinstance(eos, int) else list(eos)


__all__ = ["CausalLMPolicy", "DEFAULT_LORA_TARGETS"]
