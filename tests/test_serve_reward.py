"""Reward servers: `python -m rebel_diffusion.serve_reward` in another process scores as the in-process reward does, in
training too, and every way a server can fail stops with one line.

Every server here listens on 127.0.0.1 and is stopped by its test; the fake servers (`ThreadingHTTPServer` in this
process) count the requests they get, and the tests bound them.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest
import torch

import rebel_diffusion.rewards.remote as remote
import rebel_diffusion.trainer as trainer
from rebel_diffusion import shapes
from rebel_diffusion.rewards import make_reward_fn
from rebel_diffusion.rewards.remote import RewardServerError
from rebel_diffusion.serve_reward import serve_in_subprocess
from rebel_diffusion.trainer import ConfigError, RewardError, train

from test_trainer import read_metrics, tiny_config

REPO = Path(__file__).resolve().parents[1]
PROMPTS = REPO / "assets" / "quickstart_prompts.txt"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def serve_reward(*args: str, log: Path) -> contextlib.AbstractContextManager[str]:
    """`python -m rebel_diffusion.serve_reward --port 0 ...` on 127.0.0.1, its URL while it runs; stopped after."""
    return serve_in_subprocess(list(args), log, env=ENV)


@pytest.fixture(scope="module")
def shape_server(tmp_path_factory) -> Iterator[str]:
    with serve_reward("--reward", "shape_fidelity", log=tmp_path_factory.mktemp("server") / "stderr") as url:
        yield url


class FakeServer:
    """A reward server in a thread of the test: `GET /health` answers an image reward, each `POST /score` what
    `answer(index, request)` returns: (status, body bytes, seconds to wait before answering)."""

    def __init__(self, answer: Callable[[int, dict], tuple[int, bytes, float]]) -> None:
        self.posts = 0
        self.stopping = threading.Event()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _send(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802
                self._send(200, json.dumps({"reward": "fake", "kind": "image"}).encode())

            def do_POST(self) -> None:  # noqa: N802
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                index, fake.posts = fake.posts, fake.posts + 1
                status, body, delay = answer(index, request)
                if fake.stopping.wait(delay):
                    return
                self._send(status, body)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> FakeServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


def scores(count: int, value: float = 0.5) -> bytes:
    return json.dumps({"scores": [value] * count}).encode()


def rendered_batch(n: int, seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    """`n` drawn shapes `(n, 3, 32, 32)` in [0, 1] with a random caption each (their own or another's): varied scores."""
    images, captions, _ = shapes.generate_dataset(n, np.random.default_rng(seed))
    rng = np.random.default_rng(seed + 1)
    prompts = [c if rng.random() < 0.5 else captions[rng.integers(n)] for c in captions]
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255, prompts


def test_the_server_scores_as_the_in_process_reward(shape_server):
    images, prompts = rendered_batch(23)
    images[:3] = torch.rand(3, 3, 32, 32)  # and noise: floats that no 8-bit encoding would carry exactly
    local = make_reward_fn("shape_fidelity")(images, prompts)
    # Split into requests of 5, three in flight: the pieces come back in order.
    served = make_reward_fn(shape_server, batch_size=5, max_concurrency=3)(images, prompts)
    assert local.std() > 0.1
    torch.testing.assert_close(served, local, rtol=0, atol=0)
    alone = make_reward_fn(shape_server)(images, prompts)  # one request
    torch.testing.assert_close(alone, local, rtol=0, atol=0)


def test_a_server_refusing_its_input_is_one_line_and_not_retried(shape_server):
    images, _ = rendered_batch(2)
    reward_fn = make_reward_fn(shape_server, retries=3)
    start = time.monotonic()
    with pytest.raises(RewardServerError) as error:
        reward_fn(images, ["a red circle on a white background", "not a caption"])
    assert time.monotonic() - start < remote.BACKOFF_S  # a 422 is the reward's answer: no retry waited for
    message = str(error.value)
    assert "\n" not in message and shape_server in message
    assert "HTTP 422" in message and "prompt 'not a caption' is not a shapes caption" in message


def test_a_training_run_scored_by_the_server_equals_the_in_process_one(tiny_lcm_path, tmp_path, shape_server):
    def run(name: str, logdir: Path) -> list[dict]:
        config = tiny_config(tiny_lcm_path, logdir, num_epochs=2, prompt_file=str(PROMPTS),
                             **{"reward.name": name, "grid.num_prompts": 0})
        return [{k: v for k, v in m.items() if k != "seconds"} for m in read_metrics(train(config))]

    local, served = run("shape_fidelity", tmp_path / "local"), run(shape_server, tmp_path / "served")
    assert served == local
    assert local[0]["reward_std"] > 0


@pytest.fixture
def fast_backoff(monkeypatch):
    monkeypatch.setattr(remote, "BACKOFF_S", 0.05)


def one_line_error(url: str, count: int = 4, **options) -> str:
    """The `RewardServerError` line of scoring `count` outputs at `url`."""
    reward_fn = make_reward_fn(url, **options)
    with pytest.raises(RewardServerError) as error:
        reward_fn(torch.zeros(count, 3, 8, 8), ["p"] * count)
    message = str(error.value)
    assert "\n" not in message and url in message, message
    return message


def test_a_slow_server_times_out_in_one_line():
    with FakeServer(lambda i, request: (200, scores(4), 5.0)) as fake:
        start = time.monotonic()
        message = one_line_error(fake.url, timeout_s=0.3, retries=0)
        assert time.monotonic() - start < 3
    assert "POST /score timed out (no answer within timeout_s = 0.3 s)" in message
    assert fake.posts == 1


@pytest.mark.parametrize("body, expected", [
    (scores(3), "answered 3 scores for 4 outputs"),
    (b'{"scores": [0.1, NaN, 0.3, 0.4]}', "score 1 of 4 is nan"),
    (b'{"scores": [0.1, null, 0.3, 0.4]}', "score 1 of 4 is null, not a number"),
    (b"<html>Bad Gateway</html>", "answered something that is not JSON"),
    (b'{"rewards": [1, 2, 3, 4]}', 'answered without a "scores" list'),
])
def test_a_wrong_answer_is_one_line_and_not_retried(body, expected):
    with FakeServer(lambda i, request: (200, body, 0.0)) as fake:
        message = one_line_error(fake.url, retries=3)
    assert expected in message, message
    assert fake.posts == 1  # the server's answer, not a lost request: asking again would get the same


def test_server_errors_are_retried_with_backoff_then_answered(fast_backoff):
    with FakeServer(lambda i, request: (500, b'{"error": "busy"}', 0.0) if i < 2 else (200, scores(4, 0.25), 0.0)) as fake:
        start = time.monotonic()
        result = make_reward_fn(fake.url, retries=2)(torch.zeros(4, 3, 8, 8), ["p"] * 4)
        assert time.monotonic() - start >= 0.05 + 0.1  # waited 0.05 s, then 0.1 s
    assert result.tolist() == [0.25] * 4 and fake.posts == 3


def test_server_errors_past_the_retries_are_one_line(fast_backoff):
    with FakeServer(lambda i, request: (500, b'{"error": "CUDA out of memory"}', 0.0)) as fake:
        message = one_line_error(fake.url, retries=2)
    assert "POST /score answered HTTP 500: CUDA out of memory (3 attempts)" in message
    assert fake.posts == 3


def test_a_server_failing_mid_run_stops_it_naming_the_url_and_the_last_checkpoint(tiny_lcm_path, tmp_path,
                                                                                   fast_backoff):
    # Epoch 0's two sampling batches are scored; from epoch 1 on the server answers 503 (retried once).
    def answer(i: int, request: dict) -> tuple[int, bytes, float]:
        return (200, scores(len(request["prompts"])), 0.0) if i < 2 else (503, b'{"error": "overloaded"}', 0.0)

    with FakeServer(answer) as fake:
        config = tiny_config(tiny_lcm_path, tmp_path, num_epochs=3, **{"reward.name": fake.url, "reward.retries": 1,
                                                                       "grid.num_prompts": 0})
        with pytest.raises(RewardError) as error:
            train(config)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"epoch 1: reward '{fake.url}' failed on the batch whose first prompt is ")
    assert f"reward server {fake.url}: POST /score answered HTTP 503: overloaded (2 attempts)" in message
    assert message.endswith(f"stopped, the last good checkpoint is {tmp_path / 'run' / 'checkpoints' / 'epoch_0001'}")
    assert fake.posts == 2 + 2  # epoch 1's first batch, tried twice; the next one, queued behind it, was not sent


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_server_down_at_start_stops_the_run_in_one_line_before_sampling(tiny_lcm_path, tmp_path):
    url = f"http://127.0.0.1:{closed_port()}"
    result = subprocess.run(
        [sys.executable, "train.py", "--config", "configs/base.py", f"--config.model.pretrained={tiny_lcm_path}",
         "--config.resolution=32", f"--config.logdir={tmp_path}", "--config.run_name=run", "--config.log_with=",
         f"--config.reward.name={url}", "--config.reward.retries=0"],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [f"error: reward '{url}': reward server {url}: GET /health got no answer "
                     f"{lines[0].split('no answer ', 1)[1]}"], result.stderr[-2000:]
    assert "(1 attempt, reward.retries = 0)" in lines[0]
    assert not (tmp_path / "run").exists()  # nothing sampled, nothing written


def test_a_server_of_text_is_refused_for_an_image_policy_before_sampling(tiny_lcm_path, tmp_path, monkeypatch):
    class TextHealth(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            body = json.dumps({"reward": "addition_exact", "kind": "text"}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), TextHealth)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with pytest.raises(ConfigError, match=f"reward server {url} scores text outputs .its /health., but policy "
                                              "'lcm' produces image"):
            train(tiny_config(tiny_lcm_path, tmp_path, **{"reward.name": url}))
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_a_text_reward_is_served_too(tmp_path):
    prompts = ["1+2=", "3+4=", "10+5=", "7+7="]
    responses = ["3", "8", " 15 ", "fourteen"]
    with serve_reward("--reward", "addition_exact", log=tmp_path / "stderr") as url:
        served = make_reward_fn(url, batch_size=3)
        torch.testing.assert_close(served(responses, prompts), make_reward_fn("addition_exact")(responses, prompts))
        assert served.served_kinds == {url: "text"}
        with pytest.raises(RewardServerError, match=r"answered HTTP 400: reward 'addition_exact' scores text; send "
                                                    r"\"responses\""):
            served(torch.zeros(4, 3, 8, 8), prompts)  # images to a text reward: the request breaks the protocol


def test_a_request_that_breaks_the_protocol_is_a_400(shape_server):
    import requests

    images = remote.encode_images(torch.zeros(2, 3, 4, 4))
    bad = [({"prompts": ["p"], "images": images}, "2 outputs but 1 prompts"),
           ({"prompts": ["p", "q"], "images": {**images, "shape": [2, 3, 4, 5]}}, "holds 384 bytes; shape [2, 3, 4, 5] "
                                                                                   "needs 480"),
           ({"prompts": ["p", "q"]}, 'give either "images"'),
           ({"prompts": "p", "images": images}, '"prompts" must be a list of strings')]
    for request, message in bad:
        answer = requests.post(shape_server + "/score", json=request, timeout=10)
        assert answer.status_code == 400 and message in answer.json()["error"], answer.text
    assert requests.post(shape_server + "/score", data=b"{", timeout=10).status_code == 400
    assert requests.get(shape_server + "/health", timeout=10).json() == {"type": "reward", "reward": "shape_fidelity",
                                                                         "kind": "image"}


def test_urls_in_reward_specs():
    from rebel_diffusion.config_keys import check_config_keys
    from rebel_diffusion.rewards import check_reward_name, parse_reward_spec, reward_options

    assert parse_reward_spec("http://127.0.0.1:8000") == [("http://127.0.0.1:8000", 1.0)]
    assert parse_reward_spec("https://scorer.lan/score") == [("https://scorer.lan/score", 1.0)]
    assert parse_reward_spec("http://h:8000:0.5,jpeg_compressibility") == [("http://h:8000", 0.5),
                                                                           ("jpeg_compressibility", 1.0)]
    assert {"batch_size", "max_concurrency", "timeout_s", "retries"} == reward_options("http://h:8000")
    for bad in ("http://", "http://h:99999", "http://h:8000/?q=1"):
        with pytest.raises(ValueError, match="reward server URL") as error:
            check_reward_name(bad)
        assert "\n" not in str(error.value)
    from configs.base import get_config

    config = get_config()
    config.reward.timeout_s = 5.0
    with pytest.raises(ValueError, match=r"reward.timeout_s is set, but reward 'jpeg_compressibility' takes no such "
                                         r"option \(an option of judge, http://host:port\)"):
        check_config_keys(config)
    config.reward.name = "http://127.0.0.1:8000"
    check_config_keys(config)  # the server's client takes it


def test_a_run_stopped_by_its_server_resumes_exactly_once_the_server_is_back(tiny_lcm_path, tmp_path, monkeypatch):
    fidelity = make_reward_fn("shape_fidelity")
    down = threading.Event()

    def answer(i: int, request: dict) -> tuple[int, bytes, float]:  # shape_fidelity, or 503 while `down`
        if down.is_set():
            return 503, b'{"error": "restarting"}', 0.0
        images = torch.from_numpy(remote.decode_images(request["images"]))
        return 200, json.dumps({"scores": fidelity(images, request["prompts"]).tolist()}).encode(), 0.0

    def config(logdir: Path, name: str, **overrides):
        return tiny_config(tiny_lcm_path, logdir, num_epochs=3, prompt_file=str(PROMPTS),
                           **{"reward.name": name, "grid.num_prompts": 0, **overrides})

    def strip(run_dir: Path) -> list[dict]:
        return [{k: v for k, v in m.items() if k != "seconds"} for m in read_metrics(run_dir)]

    straight = strip(train(config(tmp_path / "straight", "shape_fidelity")))
    with FakeServer(answer) as fake:
        saved = trainer.save_checkpoint

        def save_then_go_down(*args, **kwargs):  # the server goes away once epoch 2's checkpoint is written
            path = saved(*args, **kwargs)
            if path.name == "epoch_0002":
                down.set()
            return path

        monkeypatch.setattr(trainer, "save_checkpoint", save_then_go_down)
        with pytest.raises(RewardError, match="answered HTTP 503: restarting .1 attempt.*the last good checkpoint is "
                                              ".*epoch_0002"):
            train(config(tmp_path / "served", fake.url, **{"reward.retries": 0}))
        monkeypatch.setattr(trainer, "save_checkpoint", saved)
        down.clear()  # the server is back
        resumed = train(config(tmp_path / "served", fake.url, resume_from=str(tmp_path / "served" / "run"),
                               **{"reward.retries": 0}))
    assert strip(resumed) == straight


def test_a_held_out_reward_server_failing_is_one_line_too(tiny_lcm_path, tmp_path):
    with FakeServer(lambda i, request: (500, b'{"error": "gone"}', 0.0)) as fake:
        (tmp_path / "heldout.txt").write_text("a red circle on a white background\n")
        config = tiny_config(tiny_lcm_path, tmp_path, num_epochs=1, prompt_file=str(PROMPTS),
                             **{"reward.name": "shape_fidelity", "eval.prompt_file": str(tmp_path / "heldout.txt"),
                                "eval.rewards": fake.url, "eval.num_seeds": 1, "grid.num_prompts": 0,
                                "reward.retries": 0})
        with pytest.raises(RewardError) as error:
            train(config)
    assert str(error.value) == (f"epoch 0: held-out evaluation: reward '{fake.url}' failed on the prompts whose first "
                                f"is 'a red circle on a white background': reward server {fake.url}: POST /score "
                                "answered HTTP 500: gone (1 attempt, reward.retries = 0); stopped, no checkpoint was "
                                "written yet")
    assert fake.posts == 1
