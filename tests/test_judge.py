"""Judges (`reward.name = "judge"` and the preference "judge") against a local OpenAI-compatible server process,
`tests/fake_openai_server.py`, whose answers follow rules simple enough to work the expected values out by hand (see
its docstring): counts of the digit "1" in the text, the brightness of attached images, fixed log-prob shares.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import io
import math
import time

import numpy as np
import pytest
import requests
import torch
from PIL import Image

import rebel_diffusion.rewards.remote as remote
from configs.base import get_config
from rebel_diffusion.config_keys import check_config_keys
from rebel_diffusion.rewards import RewardSetupError, make_reward_fn
from rebel_diffusion.rewards.judge import JudgeOptions
from rebel_diffusion.rewards.preference import make_preference_fn
from rebel_diffusion.rewards.remote import RewardServerError
from rebel_diffusion.serve_reward import server_process
from rebel_diffusion.trainer import ConfigError, train

from processes import REPO
from test_serve_reward import closed_port
from test_trainer import read_metrics, text_config

MODEL = "judge-model"
FAKE = str(REPO / "tests" / "fake_openai_server.py")


@pytest.fixture(scope="module")
def server_factory(tmp_path_factory):
    """Start fake servers (`mode`, `model`) for the module; each URL ends in /v1."""
    with contextlib.ExitStack() as stack:
        def start(mode: str = "ok", model: str = MODEL) -> str:
            log = tmp_path_factory.mktemp("fake") / "stderr"
            line = stack.enter_context(server_process([FAKE, "--port", "0", "--model", model, "--mode", mode], log,
                                                      "serving", {"OMP_NUM_THREADS": "1"}))
            return line.split()[-1]

        yield start


@pytest.fixture(scope="module")
def url(server_factory) -> str:
    return server_factory()


def requests_seen(url: str) -> list[dict]:
    return requests.get(url + "/requests", timeout=10).json()["requests"]


def judge(url: str, **options) -> dict:
    return {"base_url": url, "model": MODEL, **options}


def reward(url: str, retries: int = 0, **options):
    return make_reward_fn("judge", judge=judge(url, **options), retries=retries)


def preference(url: str, **options):
    return make_preference_fn("judge", judge=judge(url, **options), retries=0)


def error_line(error: pytest.ExceptionInfo, *parts: str) -> str:
    message = str(error.value)
    assert "\n" not in message, message
    for part in parts:
        assert part in message, message
    return message


# ---- Scalar scores ----

def test_a_number_is_read_from_the_reply_and_mapped_to_0_1(url):
    responses = ["1", "111", "a1b1", "none here"]  # the fake answers "{count of 1s:.4f}/10": 1, 3, 2 and 0
    raw = reward(url, template="Rate: {response} (for {prompt})")(responses, ["draw"] * 4)
    assert raw.tolist() == [1.0, 3.0, 2.0, 0.0]  # the first number: "3.0000", not the "10" after it
    mapped = reward(url, template="Rate: {response}", score_min=0.0, score_max=10.0)(responses, ["draw"] * 4)
    assert mapped.tolist() == pytest.approx([0.1, 0.3, 0.2, 0.0])
    # On a 1-5 scale: (1 - 1) / 4, (3 - 1) / 4, (2 - 1) / 4; a 0 is outside it, an error rather than a clipped score.
    likert = reward(url, template="Rate: {response}", score_min=1.0, score_max=5.0)
    assert likert(responses[:3], ["draw"] * 3).tolist() == pytest.approx([0.0, 0.5, 0.25])
    with pytest.raises(RewardServerError) as error:
        likert(["none here"], ["draw"])
    error_line(error, "the reply '0.0000/10' scores 0, outside [reward.judge.score_min, reward.judge.score_max] = "
                      "[1, 5]")
    # A pattern's group picks another number: the "10" of "3.0000/10".
    by_pattern = reward(url, template="{response}", pattern=r"/(\d+)")(["111"], ["p"])
    assert by_pattern.tolist() == [10.0]
    sent = requests_seen(url)[-1]["body"]
    assert sent["model"] == MODEL and sent["temperature"] == 0.0 and sent["max_tokens"] == 16
    assert "logprobs" not in sent and sent["messages"] == [{"role": "user", "content": "111"}]


def test_yes_prob_is_p_yes_over_p_yes_plus_no_from_the_top_logprobs(url):
    # One "1": w = 1/2; "Yes" 0.2 and " yes" 0.05 against "No" 0.15 and "no " 0.05 ("Maybe", "yesterday" are neither):
    # (0.25) / (0.25 + 0.2) = 5/9. Three: w = 3/4, 0.375 / (0.375 + 0.1) = 15/19. None: no "yes" at all, 0.
    fn = reward(url, template="Is {response} good for {prompt}?", score="yes_prob", system="Answer yes or no.")
    assert fn(["1", "111", "x"], ["p"] * 3).tolist() == pytest.approx([5 / 9, 15 / 19, 0.0])
    sent = requests_seen(url)[-1]["body"]
    assert sent["logprobs"] is True and sent["top_logprobs"] == 20 and sent["max_tokens"] == 1
    assert sent["messages"][0] == {"role": "system", "content": "Answer yes or no."}
    # Only the top 2 tokens counted ("Yes" 0.2, "No" 0.15): 0.2 / 0.35 = 4/7.
    top_two = reward(url, template="{response}", score="yes_prob", top_logprobs=2)(["1"], ["p"])
    assert top_two.tolist() == pytest.approx([4 / 7])


def test_an_image_reaches_the_judge_intact_as_a_png_data_url(url):
    images = torch.zeros(3, 3, 8, 8)
    images[0, :, :2] = 1.0  # 2 of 8 rows white: brightness 0.25
    images[1] = 0.2  # 51 / 255 = 0.2 after rounding to 8 bits
    images[2] = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    fn = reward(url, template="Does this image show {prompt}?", score_min=0.0, score_max=10.0)
    scores = fn(images, ["a cat"] * 3)
    assert scores[:2].tolist() == pytest.approx([0.25, 0.2], abs=1e-4)  # the fake replies with 4 decimals
    sent = requests_seen(url)[-3:]  # one request per image, in any order under max_concurrency
    received = []
    for request in sent:
        image_part, text_part = request["body"]["messages"][0]["content"]
        assert text_part == {"type": "text", "text": "Does this image show a cat?"}
        data = image_part["image_url"]["url"].removeprefix("data:image/png;base64,")
        received.append(np.asarray(Image.open(io.BytesIO(base64.b64decode(data)))))
    expected = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert sorted(r.tobytes() for r in received) == sorted(e.tobytes() for e in expected)


def test_a_template_that_cannot_show_the_output_is_refused(url):
    with pytest.raises(ValueError) as error:
        reward(url, template="Rate {prompt}")(["1"], ["p"])
    error_line(error, "reward.judge.template lacks {response}")
    with pytest.raises(ValueError) as error:
        reward(url, template="Rate {response}")(torch.zeros(1, 3, 4, 4), ["p"])
    error_line(error, "reward.judge.template uses {response}, but the outputs are images")


# ---- Pairwise ----

def test_the_pairwise_judge_averages_both_orders(url):
    # The fake weighs the first position a = v1 + 2, the second b = v2 + 1: P(A) = a / (a + b), "A" + " A" vs "B".
    # Pair 1 ("11" vs ""): a first 4/5; b first 2/(2+3) = 2/5, so 3/5 for a; mean 7/10.
    # Pair 2 ("" vs "1111"): a first 2/7; b first 6/7, so 1/7 for a; mean 3/14.
    prompts, a, b = ["p", "q"], ["11", ""], ["", "1111"]
    fn = preference(url, compare_template="{prompt}|{response_a}|{response_b}")
    assert fn(prompts, a, b).tolist() == pytest.approx([7 / 10, 3 / 14])
    one_order = preference(url, compare_template="{prompt}|{response_a}|{response_b}", both_orders=False)
    assert one_order(prompts, a, b).tolist() == pytest.approx([4 / 5, 2 / 7])
    sent = requests_seen(url)[-1]["body"]
    assert sent["logprobs"] is True and sent["max_tokens"] == 1


def test_the_pairwise_judge_reads_an_a_or_b_answer(url):
    # "11" vs "": A both ways round (4 >= 1, then 2 < 3 is B: a wins again): 1. "1" vs "11": A first (3 >= 3) and A
    # swapped (4 >= 2): the judge always picks the first, so the two orders cancel to 1/2.
    fn = preference(url, compare_template="{prompt}|{response_a}|{response_b}", compare_score="answer")
    assert fn(["p", "q"], ["11", "1"], ["", "11"]).tolist() == [1.0, 0.5]
    assert "logprobs" not in requests_seen(url)[-1]["body"]


def test_the_pairwise_judge_compares_two_images(url):
    # White (v = 10) vs black (0): first 12/13; swapped 2/13, so 11/13 for a; mean 23/26.
    white, black = torch.ones(1, 3, 4, 4), torch.zeros(1, 3, 4, 4)
    fn = preference(url, compare_template="Which image fits {prompt} better, the first (A) or the second (B)?")
    assert fn(["a snowfield"], white, black).tolist() == pytest.approx([23 / 26])
    parts = requests_seen(url)[-1]["body"]["messages"][0]["content"]
    assert [part["type"] for part in parts] == ["image_url", "image_url", "text"]


# ---- Failures ----

@pytest.fixture
def fast_backoff(monkeypatch):
    monkeypatch.setattr(remote, "BACKOFF_S", 0.01)


def test_a_server_without_the_model_or_without_an_answer_fails_at_build(server_factory, fast_backoff):
    other = server_factory(model="another-model")
    with pytest.raises(RewardSetupError) as error:
        reward(other, template="{response}")
    error_line(error, f"judge {MODEL!r} at {other}", "does not serve that model", "'another-model'")
    down = f"http://127.0.0.1:{closed_port()}/v1"
    with pytest.raises(RewardSetupError) as error:
        reward(down, retries=1, template="{response}")
    error_line(error, f"judge {MODEL!r} at {down}: GET /models got no answer", "(2 attempts)")


def test_a_judge_down_at_start_stops_the_run_before_sampling(tmp_path):
    down = f"http://127.0.0.1:{closed_port()}/v1"
    config = text_config(tmp_path, num_epochs=1, **{"reward.name": "judge", "reward.retries": 0,
                                                    "reward.judge.base_url": down, "reward.judge.model": MODEL,
                                                    "reward.judge.template": "{response}"})
    with pytest.raises(ConfigError) as error:
        train(config)
    error_line(error, f"reward 'judge': judge {MODEL!r} at {down}: GET /models got no answer")
    assert not (tmp_path / "run").exists()  # nothing sampled, nothing written


@pytest.mark.parametrize("options, expected", [
    ({}, ": the reply 'I cannot rate this.' has no number"),
    ({"pattern": r"score (\d+)"}, r": the reply 'I cannot rate this.' gives no number by reward.judge.pattern "
                                  r"'score (\\d+)'"),
    ({"score": "yes_prob"}, ": neither 'yes' nor 'no' is among the first token's top 2 log-probs ('I', 'Sorry')"),
])
def test_a_reply_that_cannot_be_read_is_one_line(server_factory, options, expected):
    words = server_factory(mode="words")
    with pytest.raises(RewardServerError) as error:
        reward(words, template="{response}", **options)(["1"], ["p"])
    error_line(error, f"judge {MODEL!r} at {words}{expected}")


def test_server_errors_are_retried_then_one_line(server_factory, fast_backoff):
    failing = server_factory(mode="fail")
    with pytest.raises(RewardServerError) as error:
        reward(failing, retries=1, template="{response}")(["1"], ["p"])
    error_line(error, f"POST /chat/completions answered HTTP 500: CUDA out of memory (2 attempts)")
    assert len(requests_seen(failing)) == 2


def test_a_slow_judge_times_out_in_one_line(server_factory):
    slow = server_factory(mode="slow")
    fn = make_reward_fn("judge", judge=judge(slow, template="{response}"), timeout_s=0.3, retries=0)
    start = time.monotonic()
    with pytest.raises(RewardServerError) as error:
        fn(["1"], ["p"])
    assert time.monotonic() - start < 3
    error_line(error, "POST /chat/completions timed out (no answer within timeout_s = 0.3 s)")


# ---- Options ----

def test_the_api_key_is_read_from_the_named_variable_and_sent_as_a_bearer_token(url, monkeypatch):
    with pytest.raises(RewardSetupError) as error:
        reward(url, template="{response}", api_key_env="JUDGE_TEST_KEY")
    error_line(error, "reward.judge.api_key_env names the environment variable JUDGE_TEST_KEY, which is not set")
    monkeypatch.setenv("JUDGE_TEST_KEY", "sk-test")
    reward(url, template="{response}", api_key_env="JUDGE_TEST_KEY")(["1"], ["p"])
    assert requests_seen(url)[-1]["authorization"] == "Bearer sk-test"


@pytest.mark.parametrize("options, expected", [
    ({"base_url": "localhost:8001"}, "reward.judge.base_url 'localhost:8001' is not valid; write http://host:port/v1"),
    ({"model": ""}, "reward.judge.model is empty"),
    ({"template": ""}, "reward.judge.template is empty"),
    ({"template": "{prompt} {answer}"}, "reward.judge.template has the field {answer}"),
    ({"template": "{response"}, "reward.judge.template is not a format string"),
    ({"score": "likert"}, "reward.judge.score is 'likert'; choose one of ('number', 'yes_prob')"),
    ({"pattern": "("}, "reward.judge.pattern '(' is not a regular expression"),
    ({"score_min": 0.0}, "reward.judge.score_min and reward.judge.score_max go together"),
    ({"score_min": 5.0, "score_max": 1.0}, "reward.judge.score_min (5.0) must be below reward.judge.score_max (1.0)"),
    ({"compare_template": "{response_a}"}, "reward.judge.compare_template is not an option of the scalar judge"),
])
def test_bad_options_are_one_line_naming_the_key(options, expected):
    # Checked before any request: the URL is never asked.
    given = {"base_url": f"http://127.0.0.1:{closed_port()}/v1", "model": MODEL, "template": "{response}", **options}
    with pytest.raises(RewardSetupError) as error:
        make_reward_fn("judge", judge=given)
    error_line(error, expected)


def test_the_options_defaults_are_the_base_configs_and_its_keys_are_accepted_for_a_judge_run():
    base = get_config().reward.judge.to_dict()
    defaults = {f.name: f.default for f in dataclasses.fields(JudgeOptions)}
    assert base == {k: v for k, v in defaults.items() if k in base}
    config = get_config()  # refused for another reward: tests/test_configs.py
    config.reward.name, config.reward.judge.model, config.reward.judge.score_min = "judge", MODEL, 0.0
    check_config_keys(config)


# ---- End to end ----

def test_the_text_quickstart_trains_with_a_judge_reward(url, tmp_path):
    # In process (train() is what train.py runs; its exit codes are tested with the reward servers): a subprocess would
    # triple the time. The judge's P(yes) grows with the count of 1s in the prompt and response: finite, in (0, 1).
    config = text_config(tmp_path, num_epochs=1, **{
        "reward.name": "judge", "reward.judge.base_url": url, "reward.judge.model": MODEL,
        "reward.judge.template": "Is {response} the sum {prompt}?", "reward.judge.score": "yes_prob"})
    metrics = read_metrics(train(config))
    assert len(metrics) == 1 and math.isfinite(metrics[0]["loss"]), metrics
    assert 0 < metrics[0]["reward_mean"] < 1 and metrics[0]["reward_std"] > 0, metrics
    assert len(requests_seen(url)) >= metrics[0]["reward_queries"]  # every output was asked about
