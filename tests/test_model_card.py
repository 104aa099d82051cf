"""Tests of the checkpoint model card."""

from __future__ import annotations

import yaml

from configs.base import get_config
from rebel_diffusion.model_card import write_model_card


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_lcm_card(tmp_path):
    config = get_config().to_dict()
    config["reward"]["name"] = "aesthetic:1.0,hpsv2:0.5"
    path = write_model_card(tmp_path, config, {"epoch": 9, "reward_mean": 6.123456789, "kl": 0.01})
    text = path.read_text()
    meta = front_matter(text)
    assert meta["base_model"] == "SimianLuo/LCM_Dreamshaper_v7" and meta["library_name"] == "diffusers"
    assert "rebel" in meta["tags"] and "text-to-image" in meta["tags"]
    for expected in ("aesthetic:1.0,hpsv2:0.5", "`train.learning_rate` | `0.0003`", "`rebel.eta`", "`lora.rank` | `8`",
                     "`kl_coef`", "| `reward_mean` | 6.12346 |", "pipe.load_lora_weights", "num_inference_steps=8"):
        assert expected in text, expected
    assert "ppo.clip_range" not in text


def test_text_card_without_metrics_and_local_base(tmp_path):
    config = get_config().to_dict()
    config.update(policy="causal_lm", algorithm="grpo")
    config["model"]["pretrained"] = str(tmp_path)
    text = write_model_card(tmp_path, config, None).read_text()
    meta = front_matter(text)
    assert "base_model" not in meta and meta["library_name"] == "peft"
    assert "PeftModel.from_pretrained" in text and "No metrics were logged." in text and "`grpo.k`" in text
