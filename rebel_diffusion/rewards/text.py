"""Rewards for text: `reward_fn(responses, prompts) -> (B,)` float32 scores.

- `reward_model`: a learned reward model, either a `transformers` sequence classifier with one label or a backbone with
  a scalar head (`scalar_head`, the format of the TL;DR reward models of the REBEL paper), scoring prompt + response
  as it was trained to read them (see `reward_model_ids`).
- `addition_exact`: 1 when the response is exactly the sum asked by an "a+b=" prompt, else 0.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)

from huggingface_hub import snapshot_download

from rebel_diffusion.rewards import RewardFn, RewardSetupError, register_reward

_ADDITION = re.compile(r"^\s*(-?\d+)\s*\+\s*(-?\d+)\s*=\s*$")
SCALAR_HEAD = "scalar_head"


def addition_target(prompt: str) -> int:
    """The sum an "a+b=" prompt asks for; `ValueError` for any other prompt."""
    match = _ADDITION.match(prompt)
    if match is None:
        raise ValueError(f"addition_exact: prompt {prompt!r} is not of the form 'a+b='")
    return int(match.group(1)) + int(match.group(2))


def addition_correct(prompt: str, response: str) -> bool:
    """Whether `response` (surrounding whitespace ignored) is exactly the integer sum asked by `prompt`."""
    return response.strip() == str(addition_target(prompt))


@register_reward("addition_exact", kind="text")
def addition_exact(device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> RewardFn:
    """1.0 for an exactly right sum, else 0.0."""

    def reward_fn(responses: list[str], prompts: list[str]) -> torch.Tensor:
        scores = [float(addition_correct(p, r)) for p, r in zip(prompts, responses, strict=True)]
        return torch.tensor(scores, dtype=torch.float32)

    return reward_fn


class ScalarHeadRewardModel(torch.nn.Module):
    """A backbone (`AutoModel`) with a linear `scalar_head` read at the last non-pad token, minus a constant `bias`."""

    def __init__(self, backbone: torch.nn.Module, hidden_size: int, bias: float = 0.0) -> None:
        super().__init__()
        self.lm_backbone = backbone
        self.scalar_head = torch.nn.Linear(hidden_size, 1)
        self.bias = bias

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Scores `(B,)` of right-padded sequences."""
        hidden = self.lm_backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        last = attention_mask.sum(dim=1) - 1
        return self.scalar_head(hidden[torch.arange(len(hidden), device=hidden.device), last]).squeeze(-1) - self.bias


def _safetensors_keys(path: Path) -> list[str]:
    """Tensor names across the folder's safetensors files."""
    keys = []
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            keys += list(f.keys())
    return keys


def _load_scalar_head_model(path: Path, keys: list[str], dtype: torch.dtype | None) -> ScalarHeadRewardModel:
    """Rebuild a backbone + `scalar_head` checkpoint: config.json holds `base_config` (the backbone's config dict),
    `hidden_size` and `bias`; the weights are `lm_backbone.*` (or unprefixed backbone names) plus `scalar_head.*`."""
    config = json.loads((path / "config.json").read_text())
    base = dict(config["base_config"])
    backbone = AutoModel.from_config(AutoConfig.for_model(base.pop("model_type"), **base))
    model = ScalarHeadRewardModel(backbone, config.get("hidden_size", backbone.config.hidden_size), config.get("bias", 0.0))
    state = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            state.update({k: f.get_tensor(k) for k in f.keys()})
    if not any(k.startswith("lm_backbone.") for k in keys):
        state = {k if k.startswith(SCALAR_HEAD + ".") else f"lm_backbone.{k}": v for k, v in state.items()}
    model.load_state_dict(state)
    return model.to(dtype) if dtype is not None else model


def reward_model_ids(tokenizer: PreTrainedTokenizerBase, prompt: str, response: str) -> list[int]:
    """The token ids a reward model scores for `prompt` + `response`: what it was trained to read.

    - With a chat template: a user turn and an assistant turn, rendered by the template and tokenized without further
      special tokens. The template decides how a turn ends: one that ends turns with EOS has written it, once; one
      that ends them otherwise (Qwen's "<|im_end|>\n") is read as it is, with nothing appended.
    - Without one: the tokenizer's encoding of prompt + response (its special tokens included), then its EOS unless
      the encoding already ends with it (a tokenizer that appends EOS itself). A plain-text reward model learns on
      finished sequences, the response's EOS included: the TL;DR reward models read their score at the EOS of
      prompt + response + EOS. The policy's EOS was stripped when decoding the response, so it is put back here
      (a response cut at the length limit is scored as finished too: `reward.missing_eos_penalty` is for those).
    """
    if getattr(tokenizer, "chat_template", None) is not None:
        conversation = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        return tokenizer(tokenizer.apply_chat_template(conversation, tokenize=False), add_special_tokens=False)["input_ids"]
    ids = tokenizer(prompt + response)["input_ids"]
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids = ids + [eos]
    return ids


def _right_padded(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> `input_ids` and `attention_mask` `(B, L)`, padded on the right with `pad_id`."""
    length = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, : len(row)] = 1
    return input_ids.to(device), attention_mask.to(device)


@register_reward("reward_model", kind="text")
def reward_model(
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    reward_model_path: str = "",
    reward_batch_size: int = 8,
) -> RewardFn:
    """A learned reward model from a local folder or a Hub id (`owner/name`, fetched into the Hub cache): a one-label
    `AutoModelForSequenceClassification`, or a backbone with a `scalar_head` (detected from its weights).

    Args (from `config.reward`): `reward_model_path` the folder or Hub id; `reward_batch_size` texts per forward.
    """
    if reward_batch_size < 1:
        raise RewardSetupError(f"reward_batch_size must be at least 1, got {reward_batch_size}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    path = Path(reward_model_path).expanduser()
    if reward_model_path and not path.exists() and reward_model_path.count("/") == 1:
        try:
            path = Path(snapshot_download(reward_model_path))
        except Exception as e:  # network, auth and missing-repo errors all mean "cannot fetch it"
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RewardSetupError(f"cannot fetch reward model {reward_model_path!r}: {first_line}") from None
    if not reward_model_path or not (path / "config.json").exists():
        raise RewardSetupError(f"reward_model_path {reward_model_path!r} is not a model folder with a config.json")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        keys = _safetensors_keys(path)
        if any(k.startswith(SCALAR_HEAD + ".") for k in keys):
            model = _load_scalar_head_model(path, keys, dtype)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=1, dtype=dtype)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RewardSetupError(f"cannot load reward model {reward_model_path!r}: {first_line}") from e
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if not isinstance(model, ScalarHeadRewardModel):
        # A sequence classifier reads its score at the last token that is not its config's pad id. Padding with EOS
        # (GPT-2/Pythia tokenizers have no pad token) would hide the EOS it was trained to score at: pad with another id.
        if pad_id == tokenizer.eos_token_id:
            pad_id = 0 if tokenizer.eos_token_id != 0 else 1
        model.config.pad_token_id = pad_id
    model.requires_grad_(False).eval().to(device)

    @torch.no_grad()
    def reward_fn(responses: list[str], prompts: list[str]) -> torch.Tensor:
        ids = [reward_model_ids(tokenizer, p, r) for p, r in zip(prompts, responses, strict=True)]
        scores = []
        for start in range(0, len(ids), reward_batch_size):
            input_ids, attention_mask = _right_padded(ids[start : start + reward_batch_size], pad_id, device)
            if isinstance(model, ScalarHeadRewardModel):
                score = model(input_ids, attention_mask)
            else:
                score = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0]
            scores.append(score.float().cpu())
        return torch.cat(scores)

    return reward_fn


__all__ = ["ScalarHeadRewardModel", "addition_correct", "addition_exact", "addition_target", "reward_model",
           "reward_model_ids"]
