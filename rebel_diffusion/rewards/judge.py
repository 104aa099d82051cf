"""Judges: a language or vision-language model on an OpenAI-compatible server (vLLM, sglang, llama.cpp's server, or
OpenAI's API) scores outputs (`reward.name = "judge"`) or compares two of them (the preference "judge").

Each output is one `POST {base_url}/chat/completions` (`base_url` ends in `/v1`, as OpenAI clients expect): a user
message made from a template, with the prompt and, for text, the response filled in; an image is attached as an
`image_url` content part holding a `data:image/png;base64,...` URL (PNG, 8 bits a channel). The reply is read as

* `score = "number"`: the first number of the reply (or `pattern`'s first group), mapped from [score_min, score_max]
  to [0, 1] when those are given;
* `score = "yes_prob"`: P(yes) = p(yes) / (p(yes) + p(no)) from the first token's top log-probs (one token is asked
  for), summing the top tokens that read "yes" or "no" once stripped and lowercased ("Yes", " yes", "YES").

The pairwise judge fills `compare_template` with the prompt and both responses (or attaches both images, first then
second) and reads P(the first is better) the same two ways: `compare_score = "prob"` from the log-probs of "A" vs "B",
`"answer"` from the first standalone A or B of the reply (1 or 0). With `both_orders` it also asks with the two swapped
and averages P(a first) with 1 - P(b first), which cancels a judge's preference for a position.

Requests go through `remote.JsonClient`: `reward.max_concurrency` in flight, `reward.timeout_s`, `reward.retries` of a
lost request or a 5xx. Before anything is sampled, `GET {base_url}/models` must list `model`.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import math
import os
import re
import string
from typing import Any, Mapping

import torch
from PIL import Image

from rebel_diffusion.rewards import RewardSetupError, register_reward
from rebel_diffusion.rewards.preference import register_preference
from rebel_diffusion.rewards.remote import JsonClient, RewardServerError, _short, check_url

# The first number of a reply: "7", "-0.5", "8.25/10" (8.25), "1e-3".
FIRST_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
SCORES = ("number", "yes_prob")
COMPARE_SCORES = ("prob", "answer")


@dataclasses.dataclass(frozen=True)
class JudgeOptions:
    """A judge's options; the defaults are `configs/base.py`'s `reward.judge.*`."""

    base_url: str = ""  # http://host:port/v1
    model: str = ""  # as the server's GET /models lists it
    system: str = ""  # a system message, when not empty
    max_tokens: int = 16  # of the reply (a log-prob score asks for one token)
    temperature: float = 0.0
    top_logprobs: int = 20  # top tokens asked for by a log-prob score
    api_key_env: str = ""  # the environment variable holding the API key, sent as a bearer token
    # The scalar judge (the reward).
    template: str = ""  # fields {prompt} and, for text, {response}
    score: str = "number"
    pattern: str = ""  # a regex whose first group (or whole match) is the score; "" = the first number
    score_min: float | None = None
    score_max: float | None = None
    # The pairwise judge (the preference).
    compare_template: str = ""  # fields {prompt} and, for text, {response_a} and {response_b}
    compare_score: str = "prob"
    both_orders: bool = True


_COMMON = frozenset({"base_url", "model", "system", "max_tokens", "temperature", "top_logprobs", "api_key_env"})
_SCALAR = _COMMON | {"template", "score", "pattern", "score_min", "score_max"}
_PAIRWISE = _COMMON | {"compare_template", "compare_score", "both_orders"}


def _fields(template: str) -> set[str]:
    return {field for _, field, _, _ in string.Formatter().parse(template) if field is not None}


def _check_template(key: str, template: str, allowed: set[str]) -> set[str]:
    """The format fields of `template`; `RewardSetupError` when it is empty, malformed or has a field not allowed."""
    if not template:
        raise RewardSetupError(f"{key} is empty; write the question to the judge, with the fields "
                               f"{', '.join('{' + f + '}' for f in sorted(allowed))}")
    try:
        fields = _fields(template)
    except ValueError as e:
        raise RewardSetupError(f"{key} is not a format string ({e}); write a literal brace as {{{{ or }}}}") from None
    unknown = sorted(fields - allowed)
    if unknown:
        raise RewardSetupError(f"{key} has the field {{{unknown[0]}}}; it may use only "
                               f"{', '.join('{' + f + '}' for f in sorted(allowed))}")
    return fields


def judge_options(given: Mapping[str, Any] | None, key: str, pairwise: bool = False) -> JudgeOptions:
    """`given` (a ConfigDict or a dict) as checked `JudgeOptions`, or `RewardSetupError` naming `key.<option>`: an
    option of the other kind of judge, a missing URL or model, a malformed template or pattern, an unknown score."""
    given = dict(given.items()) if given is not None else {}
    allowed = _PAIRWISE if pairwise else _SCALAR
    unknown = sorted(set(given) - allowed)
    if unknown:
        raise RewardSetupError(f"{key}.{unknown[0]} is not an option of the {'pairwise' if pairwise else 'scalar'} "
                               f"judge; it takes {', '.join(sorted(allowed))}")
    options = JudgeOptions(**given)
    try:
        check_url(options.base_url, what=f"{key}.base_url", example="http://host:port/v1")
    except ValueError as e:
        raise RewardSetupError(str(e)) from None
    if not options.model:
        raise RewardSetupError(f"{key}.model is empty; name the model the server at {options.base_url} serves")
    if options.max_tokens < 1 or options.top_logprobs < 1:
        raise RewardSetupError(f"{key}.max_tokens and {key}.top_logprobs must be at least 1")
    if not options.temperature >= 0:
        raise RewardSetupError(f"{key}.temperature must be non-negative, got {options.temperature}")
    if options.api_key_env and not os.environ.get(options.api_key_env):
        raise RewardSetupError(f"{key}.api_key_env names the environment variable {options.api_key_env}, which is "
                               "not set")
    if pairwise:
        _check_template(f"{key}.compare_template", options.compare_template, {"prompt", "response_a", "response_b"})
        if options.compare_score not in COMPARE_SCORES:
            raise RewardSetupError(f"{key}.compare_score is {options.compare_score!r}; choose one of {COMPARE_SCORES}")
        return options
    _check_template(f"{key}.template", options.template, {"prompt", "response"})
    if options.score not in SCORES:
        raise RewardSetupError(f"{key}.score is {options.score!r}; choose one of {SCORES}")
    try:
        re.compile(options.pattern or FIRST_NUMBER)
    except re.error as e:
        raise RewardSetupError(f"{key}.pattern {options.pattern!r} is not a regular expression ({e})") from None
    if (options.score_min is None) != (options.score_max is None):
        raise RewardSetupError(f"{key}.score_min and {key}.score_max go together; give both or neither")
    if options.score_min is not None and not options.score_min < options.score_max:
        raise RewardSetupError(f"{key}.score_min ({options.score_min}) must be below {key}.score_max "
                               f"({options.score_max})")
    return options


def png_data_urls(images: torch.Tensor) -> list[str]:
    """`(B, 3, H, W)` images in [0, 1] -> B `data:image/png;base64,...` URLs (each value rounded to 8 bits)."""
    pixels = images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    urls = []
    for array in pixels:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        urls.append("data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"))
    return urls


class Judge(JsonClient):
    """The chat-completions client of one model on one server; checks at construction that the server lists it."""

    def __init__(self, options: JudgeOptions, max_concurrency: int = 4, timeout_s: float = 60.0,
                 retries: int = 3) -> None:
        headers = {"Authorization": f"Bearer {os.environ[options.api_key_env]}"} if options.api_key_env else None
        super().__init__(options.base_url, f"judge {options.model!r} at {options.base_url.rstrip('/')}",
                         max_concurrency=max_concurrency, timeout_s=timeout_s, retries=retries, headers=headers)
        self.options = options
        try:
            listing = self.request("GET", "/models")
        except RewardServerError as e:
            raise RewardSetupError(str(e)) from None
        data = listing.get("data") if isinstance(listing, dict) else None
        if not isinstance(data, list):
            raise RewardSetupError(f"{self.name}: GET /models answered {_short(json.dumps(listing), 100)}; expected "
                                   '{"data": [{"id": model}, ...]}')
        served = [entry.get("id") for entry in data if isinstance(entry, dict)]
        if options.model not in served:
            raise RewardSetupError(f"{self.name}: the server does not serve that model (GET /models lists "
                                   f"{', '.join(map(repr, served)) or 'none'})")

    def ask(self, text: str, images: list[str], logprobs: bool) -> tuple[str, list[dict]]:
        """The reply to `text` with the image URLs attached, and (with `logprobs`) its first token's top log-probs."""
        # Without images the content is a plain string: text-only servers (llama.cpp) may refuse a list of parts.
        content: Any = [*({"type": "image_url", "image_url": {"url": url}} for url in images),
                        {"type": "text", "text": text}] if images else text
        messages = [{"role": "system", "content": self.options.system}] if self.options.system else []
        request: dict[str, Any] = {"model": self.options.model, "messages": [*messages, {"role": "user",
                                                                                         "content": content}],
                                   "temperature": self.options.temperature, "max_tokens": self.options.max_tokens}
        if logprobs:
            request.update(max_tokens=1, logprobs=True, top_logprobs=self.options.top_logprobs)
        answer = self.request("POST", "/chat/completions", json.dumps(request).encode())
        where = f"{self.name}: POST /chat/completions"
        try:
            choice = answer["choices"][0]
            reply = choice["message"]["content"]
            top = choice["logprobs"]["content"][0]["top_logprobs"] if logprobs else []
        except (KeyError, IndexError, TypeError):
            wanted = "choices[0].logprobs.content[0].top_logprobs" if logprobs else "choices[0].message.content"
            hint = " (does the server return log-probs? else use the number score)" if logprobs else ""
            raise RewardServerError(f"{where} answered without {wanted}{hint}: {_short(json.dumps(answer), 120)}"
                                    ) from None
        return str(reply or ""), top

    def two_way(self, top: list[dict], first: str, second: str) -> float:
        """p(first) / (p(first) + p(second)) over the top tokens reading `first` or `second` (stripped, lowercased)."""
        mass = {first: 0.0, second: 0.0}
        for entry in top:
            token = str(entry.get("token", "")).strip().lower() if isinstance(entry, dict) else ""
            if token in mass:
                mass[token] += math.exp(float(entry.get("logprob", -math.inf)))
        if mass[first] + mass[second] == 0:
            tokens = ", ".join(repr(e.get("token")) for e in top[:8] if isinstance(e, dict)) or "none"
            raise RewardServerError(f"{self.name}: neither {first!r} nor {second!r} is among the first token's top "
                                    f"{len(top)} log-probs ({tokens}); ask for a one-word answer or raise top_logprobs")
        return mass[first] / (mass[first] + mass[second])


def _outputs_and_images(outputs: Any) -> tuple[list[Any], bool]:
    """Each output as what a template or an image part takes: text as strings, images as PNG data URLs."""
    if isinstance(outputs, torch.Tensor):
        return png_data_urls(outputs), True
    return [str(o) for o in outputs], False


def _check_fields(key: str, fields: set[str], response_fields: set[str], images: bool) -> None:
    """Text outputs must reach the judge through the template's response fields; images are attached instead."""
    if images and fields & response_fields:
        raise ValueError(f"{key} uses {{{sorted(fields & response_fields)[0]}}}, but the outputs are images, "
                         "attached to the message; remove it")
    if not images and response_fields - fields:
        raise ValueError(f"{key} lacks {{{sorted(response_fields - fields)[0]}}}, so the judge would not see the "
                         "text it scores; add it")


class JudgeReward:
    """`reward_fn(outputs, prompts) -> (B,)` float32: the judge's score of each output, one request each."""

    def __init__(self, judge: Judge, key: str = "reward.judge") -> None:
        self.judge, self.options, self.key = judge, judge.options, key
        self._fields = _fields(self.options.template)
        self._pattern = re.compile(self.options.pattern or FIRST_NUMBER)

    def _number(self, reply: str) -> float:
        match = self._pattern.search(reply)
        text = (match.group(1) if self._pattern.groups else match.group(0)) if match else None
        try:
            value = float(text)
        except (TypeError, ValueError):
            what = (f"gives no number by {self.key}.pattern {self.options.pattern!r}" if self.options.pattern else
                    "has no number")
            raise RewardServerError(f"{self.judge.name}: the reply {_short(reply, 80)!r} {what}") from None
        low, high = self.options.score_min, self.options.score_max
        if low is None:
            return value
        if not low <= value <= high:
            raise RewardServerError(f"{self.judge.name}: the reply {_short(reply, 80)!r} scores {value:g}, outside "
                                    f"[{self.key}.score_min, {self.key}.score_max] = [{low:g}, {high:g}]")
        return (value - low) / (high - low)

    def _score(self, item: tuple[Any, str, bool]) -> float:
        output, prompt, image = item
        text = self.options.template.format(prompt=prompt, response=output)
        reply, top = self.judge.ask(text, [output] if image else [], logprobs=self.options.score == "yes_prob")
        return self.judge.two_way(top, "yes", "no") if self.options.score == "yes_prob" else self._number(reply)

    def __call__(self, outputs: Any, prompts: list[str]) -> torch.Tensor:
        items, images = _outputs_and_images(outputs)
        _check_fields(f"{self.key}.template", self._fields, {"response"}, images)
        scores = self.judge.map(self._score, [(o, p, images) for o, p in zip(items, prompts)])
        return torch.tensor(scores, dtype=torch.float32)


class JudgePreference:
    """`preference_fn(prompts, outputs_a, outputs_b) -> (B,)` float32 P(a beats b), by the judge's comparison."""

    def __init__(self, judge: Judge, key: str = "preference.judge") -> None:
        self.judge, self.options, self.key = judge, judge.options, key
        self._fields = _fields(self.options.compare_template)

    def _first_wins(self, item: tuple[str, Any, Any, bool]) -> float:
        prompt, first, second, images = item
        text = self.options.compare_template.format(prompt=prompt, response_a=first, response_b=second)
        reply, top = self.judge.ask(text, [first, second] if images else [],
                                    logprobs=self.options.compare_score == "prob")
        if self.options.compare_score == "prob":
            return self.judge.two_way(top, "a", "b")
        # An uppercase letter standing alone: "Answer: B", "A." (not the article "a", not inside "Both").
        match = re.search(r"\b([AB])\b", reply)
        if match is None:
            raise RewardServerError(f"{self.judge.name}: the reply {_short(reply, 80)!r} names neither A nor B")
        return 1.0 if match.group(1) == "A" else 0.0

    def __call__(self, prompts: list[str], outputs_a: Any, outputs_b: Any) -> torch.Tensor:
        a, images = _outputs_and_images(outputs_a)
        b, _ = _outputs_and_images(outputs_b)
        _check_fields(f"{self.key}.compare_template", self._fields, {"response_a", "response_b"}, images)
        items = [(p, x, y, images) for p, x, y in zip(prompts, a, b)]
        if self.options.both_orders:
            items += [(p, y, x, images) for p, x, y in zip(prompts, a, b)]
        wins = torch.tensor(self.judge.map(self._first_wins, items), dtype=torch.float32)
        if not self.options.both_orders:
            return wins
        # P(a beats b) asked with b first is 1 - P(b first wins): averaging the two cancels a bias for a position.
        return (wins[: len(prompts)] + 1 - wins[len(prompts):]) / 2


@register_reward("judge", kind="any")
def judge_reward(device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 judge: Mapping[str, Any] | None = None, max_concurrency: int = 4, timeout_s: float = 60.0,
                 retries: int = 3) -> JudgeReward:
    """`reward.name = "judge"`: options `reward.judge.*` (`JudgeOptions`), and the request knobs of a reward server.
    The model runs on its server: `device` and `dtype` are not used."""
    options = judge_options(judge, "reward.judge")
    return JudgeReward(Judge(options, max_concurrency=max_concurrency, timeout_s=timeout_s, retries=retries))


@register_preference("judge", kind="any")
def judge_preference(device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                     judge: Mapping[str, Any] | None = None, max_concurrency: int = 4, timeout_s: float = 60.0,
                     retries: int = 3) -> JudgePreference:
    """The preference "judge": options `judge` (`JudgeOptions`' common and pairwise fields) and the request knobs."""
    options = judge_options(judge, "preference.judge", pairwise=True)
    return JudgePreference(Judge(options, max_concurrency=max_concurrency, timeout_s=timeout_s, retries=retries))
