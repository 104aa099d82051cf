import sys

import pytest
import torch

from rebel_diffusion.rewards import available_rewards, check_reward_name, make_reward_fn, register_reward


def test_builtin_rewards_are_registered():
    assert {"aesthetic", "jpeg_compressibility", "jpeg_incompressibility"} <= set(available_rewards())


def test_module_function_path_is_a_user_reward(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text("def brightness(images, prompts):\n    return images.mean(dim=(1, 2, 3))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reward_fn = make_reward_fn("my_rewards:brightness", device="cpu", head_path="ignored")
    images = torch.stack([torch.zeros(3, 4, 4), torch.ones(3, 4, 4)])
    assert reward_fn(images, ["a", "b"]).tolist() == [0.0, 1.0]
    sys.modules.pop("my_rewards", None)


@pytest.mark.parametrize(
    "name, message",
    [("beauty", "unknown reward 'beauty'"), ("nonexistent_mod:f", "cannot import"), ("math:nope", "has no function")],
)
def test_bad_reward_names_are_clear_errors(name, message):
    with pytest.raises(ValueError, match=message):
        check_reward_name(name)


def test_factories_receive_only_the_options_they_name():
    seen = {}

    @register_reward("test_only_scale")
    def factory(device=None, dtype=None, scale: float = 1.0):
        seen.update(device=device, scale=scale)
        return lambda images, prompts: scale * images.mean(dim=(1, 2, 3))

    reward_fn = make_reward_fn("test_only_scale", device="cpu", scale=3.0, head_path="/x", batch_size=4)
    assert seen == {"device": "cpu", "scale": 3.0}
    assert reward_fn(torch.ones(1, 3, 2, 2), ["p"]).item() == 3.0


def test_a_reward_taking_a_generator_gets_it_alone_and_in_a_weighted_list(tmp_path, monkeypatch):
    (tmp_path / "gen_rewards.py").write_text(
        "import torch\n"
        "def noisy(outputs, prompts, generator=None):\n    return torch.rand(len(prompts), generator=generator)\n"
        "def plain(outputs, prompts):\n    return torch.ones(len(prompts))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    images, prompts = torch.zeros(3, 3, 4, 4), ["a", "b", "c"]
    alone = make_reward_fn("gen_rewards:noisy")
    weighted = make_reward_fn("gen_rewards:noisy:2.0,gen_rewards:plain:1.0")
    expected = torch.rand(3, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(alone(images, prompts, generator=torch.Generator().manual_seed(7)), expected)
    torch.testing.assert_close(weighted(images, prompts, generator=torch.Generator().manual_seed(7)), 2 * expected + 1)
    assert alone(images, prompts).shape == (3,)  # without a generator, the function's default applies
