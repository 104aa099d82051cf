"""A preference server: `python -m rebel_diffusion.serve_reward --preference` in another process answers `POST /compare`
as the in-process preference would, through the `preference.name = "http://host:port"` client."""

from __future__ import annotations

import pytest
import requests
import torch

from rebel_diffusion.rewards import RewardSetupError, make_reward_fn
from rebel_diffusion.rewards.preference import make_preference_fn
from rebel_diffusion.rewards.remote import encode_images
from rebel_diffusion.serve_reward import PreferenceService, ProtocolError

from test_serve_reward import rendered_batch, serve_reward


def test_a_preference_server_compares_as_the_in_process_preference(tmp_path):
    images, prompts = rendered_batch(10, seed=3)
    images_a, images_b, prompts = images[:5], images[5:], prompts[:5]
    scores_a, scores_b = (make_reward_fn("large_shape")(side, prompts) for side in (images_a, images_b))
    expected = torch.sigmoid((scores_a - scores_b) / 0.1)  # Bradley-Terry at temperature 0.1, by hand
    assert (scores_a != scores_b).any()
    with serve_reward("--preference", "bradley_terry", "--reward", "large_shape", "--temperature", "0.1",
                      log=tmp_path / "stderr") as url:
        assert requests.get(url + "/health", timeout=10).json() == {"type": "preference", "preference": "bradley_terry",
                                                                    "kind": "image"}
        # Requests of 2 pairs, two in flight: the pieces come back in order.
        served = make_preference_fn(url, batch_size=2, max_concurrency=2)
        assert served.served_kind == "image"
        torch.testing.assert_close(served(prompts, images_a, images_b), expected, atol=1e-6, rtol=0)
        # A reward client finds a preference server out at its /health, and the server refuses half a pair.
        with pytest.raises(RewardSetupError, match=f"reward server {url}: the server serves a preference, not a "
                                                   "reward"):
            make_reward_fn(url)
        answer = requests.post(url + "/compare", json={"prompts": prompts[:1], "images_a": encode_images(images_a[:1])},
                               timeout=10)
        assert answer.status_code == 400 and 'give either "images_b"' in answer.json()["error"]
        assert requests.post(url + "/score", json={}, timeout=10).status_code == 404
        answer = requests.post(url + "/compare", json={"prompts": prompts[:1], "images_a": encode_images(images_a[:2]),
                                                       "images_b": encode_images(images_b[:1])}, timeout=10)
        assert answer.status_code == 400 and answer.json()["error"] == "2 outputs in images_a but 1 prompts"


def test_a_text_preference_service_compares_responses():
    prompts, responses_a, responses_b = ["1+2=", "3+4="], ["3", "8"], ["4", "7"]
    fn = make_preference_fn("bradley_terry", reward="addition_exact", temperature=0.5)
    service = PreferenceService("bradley_terry", fn, "text", torch.device("cpu"))
    answer = service.answer({"prompts": prompts, "responses_a": responses_a, "responses_b": responses_b})
    scores_a, scores_b = (make_reward_fn("addition_exact")(side, prompts) for side in (responses_a, responses_b))
    assert scores_a.tolist() != scores_b.tolist()
    torch.testing.assert_close(torch.tensor(answer["probabilities"]), torch.sigmoid((scores_a - scores_b) / 0.5))
    with pytest.raises(ProtocolError, match="preference 'bradley_terry' compares text; send \"responses_a\""):
        service.answer({"prompts": prompts, "images_a": encode_images(torch.zeros(2, 3, 4, 4)),
                        "responses_b": responses_b})
