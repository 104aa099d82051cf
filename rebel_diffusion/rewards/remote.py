"""The client of a reward server: `reward.name = "http://host:port"` scores outputs with a reward that runs in another
process (`python -m rebel_diffusion.serve_reward`, or any server speaking the protocol below).

Protocol (JSON over HTTP; the README's "Reward servers" section is the reference for writing a server):

* `GET /health` -> `{"type": "reward", "reward": "<name>", "kind": "image" | "text" | "any"}`; asked once when the
  reward is built, before any model loads, so that a server that does not answer stops the run before it samples.
  (`"type"` may be missing: servers written before preferences existed serve rewards.)
* `POST /score` with `{"prompts": [...], "images": {"dtype": "float32", "shape": [B, 3, H, W], "data": "<base64>"}}`
  (the images' float32 values in [0, 1], little-endian, C order) or `{"prompts": [...], "responses": [...]}` for text,
  and optionally `"seed"` (an integer: a reward that draws random numbers draws from a generator seeded with it)
  -> `{"scores": [B numbers]}`. An error is any other status, with `{"error": "<one line>"}` as its body.
* A preference server (`preference.name = "http://host:port"`, `serve_reward --preference NAME`) answers `/health` with
  `{"type": "preference", "preference": "<name>", "kind": ...}` and `POST /compare` with `{"prompts": [...],
  "images_a": <images>, "images_b": <images>}` (or `"responses_a"`, `"responses_b"`) -> `{"probabilities": [B numbers
  in [0, 1]]}`, P(a beats b) for each pair.

A batch is split into requests of at most `batch_size` outputs, at most `max_concurrency` of them in flight at once.
A request that gets no answer (connection refused or reset, no byte for `timeout_s` seconds) or an HTTP 5xx or 429 is
retried `retries` times, after 0.5 s, 1 s, 2 s, ... (at most 10 s); an answer that breaks the protocol (a 4xx, not
JSON, no `scores`, the wrong number of them, NaN, infinite or non-numeric scores) is the server's deterministic answer
and is not retried. Either way the reward raises `RewardServerError`, one line naming the URL and what went wrong. The
preference client does all of this the same way (`_ServedClient`).
"""

from __future__ import annotations

import base64
import json
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable
from urllib.parse import urlsplit

import numpy as np
import requests
import torch

from rebel_diffusion.rewards import RewardSetupError

BACKOFF_S = 0.5  # the first retry's wait; doubled at each retry
MAX_BACKOFF_S = 10.0
RETRIED_STATUS = frozenset({429, 500, 502, 503, 504})


class RewardServerError(RuntimeError):
    """A reward server failed to score a batch; the message is one line naming the URL and the error."""


class _Transient(Exception):
    """A failure worth retrying (no answer, a 5xx); its message is the line to report when the retries run out."""


def check_url(url: str, what: str = "reward server URL", example: str = "http://host:port") -> None:
    """`ValueError` (one line, naming `what`) unless `url` is `http(s)://host[:port][/path]`."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError for a port that is not a number in 0-65535
    except ValueError as e:
        raise ValueError(f"{what} {url!r} is not valid ({e})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{what} {url!r} is not valid; write {example}")
    if parts.query or parts.fragment:
        raise ValueError(f"{what} {url!r} must not have a query or fragment")


def encode_images(images: torch.Tensor) -> dict[str, Any]:
    """`(B, 3, H, W)` images -> the protocol's `{"dtype": "float32", "shape": [...], "data": base64}` (exact)."""
    array = np.ascontiguousarray(images.detach().to("cpu", torch.float32).numpy(), dtype="<f4")
    return {"dtype": "float32", "shape": list(array.shape), "data": base64.b64encode(array.tobytes()).decode("ascii")}


def decode_images(payload: Any) -> np.ndarray:
    """The protocol's image payload -> a `(B, 3, H, W)` float32 array; `ValueError` (one line) when it is malformed."""
    if not isinstance(payload, dict) or payload.get("dtype") != "float32":
        raise ValueError('"images" must be {"dtype": "float32", "shape": [B, 3, H, W], "data": "<base64>"}')
    shape = payload.get("shape")
    if not isinstance(shape, list) or len(shape) != 4 or not all(isinstance(n, int) and n >= 0 for n in shape):
        raise ValueError(f'"images.shape" must be [B, 3, H, W], got {shape!r}')
    try:
        data = base64.b64decode(payload.get("data", ""), validate=True)
    except (ValueError, TypeError) as e:
        raise ValueError(f'"images.data" is not base64 ({e})') from None
    if len(data) != 4 * math.prod(shape):
        raise ValueError(f'"images.data" holds {len(data)} bytes; shape {shape} needs {4 * math.prod(shape)}')
    return np.frombuffer(data, dtype="<f4").reshape(shape).astype(np.float32)


def _short(text: str, limit: int = 200) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


class JsonClient:
    """JSON over HTTP to one server, shared by the reward-server client and the judges (`rewards.judge`).

    Each thread keeps its own `requests.Session` (a keep-alive connection pool); `map` runs at most `max_concurrency`
    calls at once. A request that gets no answer within `timeout_s` or an HTTP 5xx or 429 is retried `retries` times
    after 0.5 s, 1 s, 2 s, ... (at most 10 s); every failure is a `RewardServerError` line beginning with `name`.
    """

    section = "reward"  # the config section whose `retries` a message names

    def __init__(self, url: str, name: str, max_concurrency: int = 4, timeout_s: float = 60.0, retries: int = 3,
                 headers: dict[str, str] | None = None) -> None:
        if max_concurrency < 1:
            raise RewardSetupError(f"{name}: max_concurrency must be at least 1")
        if not timeout_s > 0 or retries < 0:
            raise RewardSetupError(f"{name}: timeout_s must be positive and retries non-negative")
        self.url, self.name = url.rstrip("/"), name
        self.max_concurrency, self.timeout_s, self.retries = int(max_concurrency), float(timeout_s), int(retries)
        self._headers = dict(headers or {})
        self._local = threading.local()

    def _session(self) -> requests.Session:
        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
        return self._local.session

    def _attempt(self, method: str, path: str, body: bytes | None) -> Any:
        """One request: the decoded JSON answer, `_Transient` for what a retry may cure, `RewardServerError` else."""
        where = f"{self.name}: {method} {path}"
        headers = {**self._headers, **({"Content-Type": "application/json"} if body else {})}
        try:
            response = self._session().request(method, self.url + path, data=body, timeout=self.timeout_s,
                                               headers=headers or None)
        except requests.Timeout:
            raise _Transient(f"{where} timed out (no answer within timeout_s = {self.timeout_s:g} s)") from None
        except requests.ConnectionError as e:
            reason = e.args[0] if e.args else e
            reason = getattr(reason, "reason", reason)
            raise _Transient(f"{where} got no answer ({_short(str(reason), 100)})") from None
        if response.status_code != 200:
            line = f"{where} answered HTTP {response.status_code}: {_short(_error_detail(response))}"
            if response.status_code in RETRIED_STATUS:
                raise _Transient(line)
            raise RewardServerError(line)
        try:
            return json.loads(response.text)  # NaN and Infinity parse, to be named by the caller
        except ValueError as e:
            raise RewardServerError(f"{where} answered something that is not JSON ({_short(str(e), 60)}): "
                                    f"{_short(response.text, 60)!r}") from None

    def request(self, method: str, path: str, body: bytes | None = None) -> Any:
        """`_attempt` with up to `retries` retries of transient failures, waiting 0.5 s, 1 s, 2 s, ... between."""
        for attempt in range(self.retries + 1):
            try:
                return self._attempt(method, path, body)
            except _Transient as e:
                if attempt == self.retries:
                    tries = f"{self.retries + 1} attempts" if self.retries else f"1 attempt, {self.section}.retries = 0"
                    raise RewardServerError(f"{e} ({tries})") from None
                time.sleep(min(MAX_BACKOFF_S, BACKOFF_S * 2**attempt))
        raise AssertionError("unreachable")

    def map(self, fn: Callable[[Any], Any], items: list) -> list:
        """`[fn(item) for item in items]`, at most `max_concurrency` at once (in this thread when there is one)."""
        if len(items) == 1:
            return [fn(items[0])]
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(items))) as pool:
            return list(pool.map(fn, items))


def _error_detail(response: requests.Response) -> str:
    """What an error answer says: `{"error": "..."}` (this protocol), `{"error": {"message": ...}}` (OpenAI) or
    `{"message": ...}` (vLLM's error object), else its text or the status's reason."""
    try:
        answer = response.json()
    except ValueError:
        return response.text or response.reason
    if not isinstance(answer, dict):
        return response.text or response.reason
    error = answer.get("error")
    if isinstance(error, dict):
        error = error.get("message")
    return str(error or answer.get("message") or "") or response.reason


class _ServedClient(JsonClient):
    """The client of a server that speaks this protocol: `/health` asked at construction (it must say it serves a
    `role`, "reward" or "preference"), then batches of `batch_size` outputs per request.

    Attributes: `url`; `served_name` and `served_kind`, what the server's `/health` said it serves.
    """

    role: str  # set by each subclass

    def __init__(self, url: str, batch_size: int = 32, max_concurrency: int = 4, timeout_s: float = 60.0,
                 retries: int = 3) -> None:
        check_url(url, f"{self.role} server URL")
        name = f"{self.role} server {url.rstrip('/')}"
        if batch_size < 1:
            raise RewardSetupError(f"{name}: batch_size must be at least 1")
        super().__init__(url, name, max_concurrency=max_concurrency, timeout_s=timeout_s, retries=retries)
        self.batch_size = int(batch_size)
        try:
            health = self.request("GET", "/health")
        except RewardServerError as e:
            raise RewardSetupError(str(e)) from None
        if not isinstance(health, dict) or health.get("kind") not in ("image", "text", "any"):
            raise RewardSetupError(f"{name}: GET /health answered {_short(json.dumps(health))}; "
                                   f'expected {{"{self.role}": name, "kind": "image" | "text" | "any"}}')
        served_type = health.get("type", "reward")
        if served_type != self.role:
            raise RewardSetupError(f"{name}: the server serves a {served_type}, not a {self.role} (its /health); name "
                                   f"it as {'preference' if served_type == 'preference' else 'reward'}.name")
        self.served_name, self.served_kind = str(health.get(self.role, "")), health["kind"]

    def _numbers(self, answer: Any, path: str, key: str, item: str, count: int) -> list[float]:
        """`answer[key]`, a list of `count` finite numbers (each an `item`), or `RewardServerError` naming what the
        server got wrong."""
        where = f"{self.name}: POST {path}"
        numbers = answer.get(key) if isinstance(answer, dict) else None
        if not isinstance(numbers, list):
            raise RewardServerError(f'{where} answered without a "{key}" list: {_short(json.dumps(answer), 80)}')
        if len(numbers) != count:
            raise RewardServerError(f"{where} answered {len(numbers)} {key} for {count} outputs")
        for i, number in enumerate(numbers):
            if isinstance(number, bool) or not isinstance(number, (int, float)):
                raise RewardServerError(f"{where}: {item} {i} of {len(numbers)} is {json.dumps(number)}, not a number")
            if not math.isfinite(number):
                raise RewardServerError(f"{where}: {item} {i} of {len(numbers)} is {number}")
        return [float(n) for n in numbers]

    def _in_chunks(self, count: int, ask: Callable[[slice, int], list[float]]) -> torch.Tensor:
        """`ask(slice, index)` for each chunk of `batch_size` of `count` outputs, up to `max_concurrency` at once, the
        answers concatenated in order as a float32 `(count,)` tensor."""
        chunks = [(slice(s, s + self.batch_size), i) for i, s in enumerate(range(0, count, self.batch_size))]
        answers = self.map(lambda chunk: ask(*chunk), chunks)
        return torch.tensor([n for answer in answers for n in answer], dtype=torch.float32)


def encode_outputs(outputs: Any, suffix: str = "") -> dict[str, Any]:
    """A request's outputs: `{"images" + suffix: payload}` for an image tensor, `{"responses" + suffix: [...]}` for
    text."""
    if isinstance(outputs, torch.Tensor):
        return {"images" + suffix: encode_images(outputs)}
    return {"responses" + suffix: [str(o) for o in outputs]}


class RemoteReward(_ServedClient):
    """`reward_fn(outputs, prompts, generator=None) -> (B,)` float32, scored by the server at `url` (`POST /score`)."""

    role = "reward"

    def _score_chunk(self, outputs: Any, prompts: list[str], seed: int | None) -> list[float]:
        request: dict[str, Any] = {"prompts": list(prompts), **encode_outputs(outputs)}
        if seed is not None:
            request["seed"] = seed
        answer = self.request("POST", "/score", json.dumps(request).encode())
        return self._numbers(answer, "/score", "scores", "score", len(prompts))

    def __call__(self, outputs: Any, prompts: list[str], generator: torch.Generator | None = None) -> torch.Tensor:
        # A generator's seed goes with each request (plus the request's index), so a random reward can seed its own.
        base = generator.initial_seed() if generator is not None else None
        return self._in_chunks(len(prompts), lambda part, i: self._score_chunk(
            outputs[part], prompts[part], None if base is None else (base + i) % 2**63))


class RemotePreference(_ServedClient):
    """`preference_fn(prompts, outputs_a, outputs_b) -> (B,)` float32 P(a beats b), asked of the server at `url`
    (`POST /compare`); the probabilities are validated by `make_preference_fn`."""

    role = section = "preference"

    def _compare_chunk(self, prompts: list[str], outputs_a: Any, outputs_b: Any) -> list[float]:
        request = {"prompts": list(prompts), **encode_outputs(outputs_a, "_a"), **encode_outputs(outputs_b, "_b")}
        answer = self.request("POST", "/compare", json.dumps(request).encode())
        return self._numbers(answer, "/compare", "probabilities", "probability", len(prompts))

    def __call__(self, prompts: list[str], outputs_a: Any, outputs_b: Any) -> torch.Tensor:
        return self._in_chunks(len(prompts), lambda part, _: self._compare_chunk(
            prompts[part], outputs_a[part], outputs_b[part]))


def remote_reward(url: str, /, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                  batch_size: int = 32, max_concurrency: int = 4, timeout_s: float = 60.0,
                  retries: int = 3) -> RemoteReward:
    """The factory of a `reward.name = "http://host:port"` reward; its keyword parameters are its `reward.*` options
    (`device` and `dtype` are the server's business)."""
    return RemoteReward(url, batch_size=batch_size, max_concurrency=max_concurrency, timeout_s=timeout_s,
                        retries=retries)


def remote_preference(url: str, /, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                      batch_size: int = 32, max_concurrency: int = 4, timeout_s: float = 60.0,
                      retries: int = 3) -> RemotePreference:
    """The factory of a `preference.name = "http://host:port"` preference; its keyword parameters are its
    `preference.*` options (pairs per request, requests in flight, seconds to wait, retries)."""
    return RemotePreference(url, batch_size=batch_size, max_concurrency=max_concurrency, timeout_s=timeout_s,
                            retries=retries)
