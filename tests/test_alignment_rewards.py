"""Tests of the prompt-alignment rewards (PickScore, CLIP score, HPS v2.1) on tiny random models of the published
architectures, saved the way the real checkpoints are, each against an independent step-by-step reference."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode
from transformers import CLIPConfig, CLIPImageProcessor, CLIPImageProcessorPil, CLIPModel, CLIPProcessor

from rebel_diffusion.rewards import RewardSetupError, make_reward_fn, reward_kind
from rebel_diffusion.rewards.preference import make_preference_fn
from rebel_diffusion.tokenizer import build_clip_tokenizer

PROMPTS = ["a red circle", "a photo of a cat on a blue sofa", "a red circle"]
TINY_OPEN_CLIP = "rebel-test-tiny-align"
# A ViT-H-14-shaped (GELU, 224 px, OpenAI mean/std) model, scaled down; open_clip's tokenizer needs the full vocabulary.
TINY_OPEN_CLIP_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 32, "head_width": 16, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def smooth_images(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Random low-frequency images in [0.2, 0.8]: antialiased bicubic resizing stays inside [0, 1], so the reward's
    clamp (which mirrors PIL's uint8 saturation) is a no-op and reference pipelines without it agree exactly."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, 6, 6, generator=generator) * 0.6 + 0.2
    return F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)


# ---- PickScore ----


@pytest.fixture(scope="module")
def tiny_pickscore(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny random transformers CLIPModel and a CLIPProcessor (real CLIP tokenizer, default CLIP image settings)."""
    root = tmp_path_factory.mktemp("tiny_pickscore")
    tokenizer = build_clip_tokenizer(root / "tokenizer")
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(image_size=224, patch_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4),
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(root / "model")
    CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=tokenizer).save_pretrained(root / "processor")
    return root / "model", root / "processor"


def pickscore_reference(model_dir: Path, processor_dir: Path, pixel_values: torch.Tensor) -> torch.Tensor:
    """PickScore as its authors compute it: processor text inputs, get_*_features, L2 norm, logit_scale.exp() * dot."""
    model = CLIPModel.from_pretrained(model_dir).eval()
    processor = CLIPProcessor.from_pretrained(processor_dir)
    text_inputs = processor(text=PROMPTS, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        image_embs = model.get_image_features(pixel_values=pixel_values)
        text_embs = model.get_text_features(**text_inputs)
    # transformers 5 returns model outputs whose pooler_output is the projected embedding; 4.x returned the tensor.
    image_embs = getattr(image_embs, "pooler_output", image_embs)
    text_embs = getattr(text_embs, "pooler_output", text_embs)
    image_embs = image_embs / image_embs.norm(dim=-1, keepdim=True)
    text_embs = text_embs / text_embs.norm(dim=-1, keepdim=True)
    return model.logit_scale.exp() * (text_embs @ image_embs.T).diagonal()


@pytest.mark.parametrize("height, width", [(256, 256), (240, 320)])
def test_pickscore_matches_the_processor_reference(tiny_pickscore, height, width):
    model_dir, processor_dir = tiny_pickscore
    images = smooth_images(len(PROMPTS), height, width)
    reward = make_reward_fn("pickscore", pickscore_model=str(model_dir), pickscore_processor=str(processor_dir),
                            batch_size=2)
    # The processor's torchvision backend on float tensors: resize, centre crop and normalise, done independently.
    pixels = CLIPImageProcessor.from_pretrained(processor_dir)(list(images), do_rescale=False,
                                                               return_tensors="pt")["pixel_values"]
    expected = pickscore_reference(model_dir, processor_dir, pixels)
    scores = reward(images, PROMPTS)
    assert scores.shape == (len(PROMPTS),) and scores.dtype == torch.float32
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=0)
    # Cached text embeddings give the same scores on a second call.
    torch.testing.assert_close(reward(images, PROMPTS), scores, atol=0, rtol=0)


def test_pickscore_is_close_to_the_authors_pil_pipeline(tiny_pickscore):
    model_dir, processor_dir = tiny_pickscore
    images = smooth_images(len(PROMPTS), 256, 256, seed=1)
    uint8 = (images * 255).round().to(torch.uint8)
    pil = [Image.fromarray(np.ascontiguousarray(image.permute(1, 2, 0).numpy())) for image in uint8]
    pixels = CLIPImageProcessorPil.from_pretrained(processor_dir)(pil, return_tensors="pt")["pixel_values"]
    expected = pickscore_reference(model_dir, processor_dir, torch.as_tensor(pixels))
    scores = make_reward_fn("pickscore", pickscore_model=str(model_dir),
                            pickscore_processor=str(processor_dir))(uint8.float() / 255, PROMPTS)
    # Only PIL's uint8 rounding of the resized image differs.
    torch.testing.assert_close(scores, expected, atol=2e-2, rtol=0)


def test_pickscore_loading_failures_are_setup_errors(tmp_path, tiny_pickscore):
    with pytest.raises(RewardSetupError, match="pickscore: cannot load the CLIP model"):
        make_reward_fn("pickscore", pickscore_model=str(tmp_path / "missing"),
                       pickscore_processor=str(tiny_pickscore[1]))
    with pytest.raises(RewardSetupError, match="pickscore: cannot load the processor"):
        make_reward_fn("pickscore", pickscore_processor=str(tmp_path / "missing"))


# ---- open_clip: CLIP score and HPS v2.1 ----


@pytest.fixture(scope="module")
def tiny_open_clip(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, torch.nn.Module]:
    """A tiny random open_clip model registered as TINY_OPEN_CLIP, saved as a plain state dict (open_clip's
    `pretrained` file format) and as HPS's `{"state_dict": ...}` checkpoint."""
    root = tmp_path_factory.mktemp("tiny_open_clip")
    (root / f"{TINY_OPEN_CLIP}.json").write_text(json.dumps(TINY_OPEN_CLIP_CFG))
    open_clip.add_model_config(root / f"{TINY_OPEN_CLIP}.json")
    torch.manual_seed(1)
    model = open_clip.create_model(TINY_OPEN_CLIP).eval()
    torch.save(model.state_dict(), root / "open_clip.pt")
    torch.save({"epoch": 1, "state_dict": model.state_dict()}, root / "hps.pt")
    return root / "open_clip.pt", root / "hps.pt", model


def test_clip_score_matches_open_clip_reference(tiny_open_clip):
    weights, _, model = tiny_open_clip
    images = smooth_images(len(PROMPTS), 240, 320, seed=2)
    # open_clip's eval transform on tensors: Resize(224, bicubic) + CenterCrop(224) + Normalize.
    pixels = TF.center_crop(TF.resize(images, 224, InterpolationMode.BICUBIC, antialias=True), [224, 224])
    pixels = TF.normalize(pixels, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)
    tokenizer = open_clip.get_tokenizer(TINY_OPEN_CLIP)
    with torch.no_grad():
        image = F.normalize(model.encode_image(pixels), dim=-1)
        text = F.normalize(model.encode_text(tokenizer(PROMPTS)), dim=-1)
    expected = (image @ text.T).diagonal()
    reward = make_reward_fn("clip_score", clip_score_model=TINY_OPEN_CLIP, clip_score_pretrained=str(weights))
    torch.testing.assert_close(reward(images, PROMPTS), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("height, width", [(256, 256), (200, 320)])
def test_hpsv2_matches_the_hps_forward(tiny_open_clip, height, width):
    _, checkpoint, model = tiny_open_clip
    images = smooth_images(len(PROMPTS), height, width, seed=3)
    # HPS's eval transform: longest side to 224 (bicubic), padded square with black, normalised.
    scale = 224 / max(height, width)
    new_h, new_w = round(height * scale), round(width * scale)
    pixels = TF.resize(images, [new_h, new_w], InterpolationMode.BICUBIC, antialias=True)
    pad_h, pad_w = 224 - new_h, 224 - new_w
    pixels = TF.pad(pixels, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0.0)
    pixels = TF.normalize(pixels, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)
    tokenizer = open_clip.get_tokenizer(TINY_OPEN_CLIP)
    with torch.no_grad():
        outputs = model(pixels, tokenizer(PROMPTS))
    image_features, text_features = (outputs["image_features"], outputs["text_features"]) if isinstance(outputs, dict) \
        else outputs[:2]
    expected = (image_features @ text_features.T).diagonal()
    reward = make_reward_fn("hpsv2", hpsv2_model=TINY_OPEN_CLIP, hpsv2_checkpoint=str(checkpoint), batch_size=2)
    torch.testing.assert_close(reward(images, PROMPTS), expected, atol=1e-4, rtol=0)


def test_hpsv2_loading_failures_are_setup_errors(tmp_path, tiny_open_clip):
    with pytest.raises(RewardSetupError, match="hpsv2: checkpoint .* not found"):
        make_reward_fn("hpsv2", hpsv2_model=TINY_OPEN_CLIP, hpsv2_checkpoint=str(tmp_path / "missing.pt"))
    wrong = tmp_path / "wrong.pt"
    torch.save({"state_dict": {"visual.proj": torch.zeros(2, 2)}}, wrong)
    with pytest.raises(RewardSetupError, match="does not fit the model") as error:
        make_reward_fn("hpsv2", hpsv2_model=TINY_OPEN_CLIP, hpsv2_checkpoint=str(wrong))
    assert "\n" not in str(error.value)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(RewardSetupError, match="cannot read the checkpoint"):
        make_reward_fn("hpsv2", hpsv2_model=TINY_OPEN_CLIP, hpsv2_checkpoint=str(corrupt))
    with pytest.raises(RewardSetupError, match="clip_score: cannot load open_clip"):
        make_reward_fn("clip_score", clip_score_model=TINY_OPEN_CLIP, clip_score_pretrained=str(tmp_path / "none.pt"))


def test_alignment_rewards_score_images():
    assert reward_kind("pickscore") == reward_kind("clip_score") == reward_kind("hpsv2") == "image"


# ---- The two-image softmax preferences ----


def check_pairwise(preference, images_a, images_b, expected):
    """`preference` against `expected`, its symmetry P(a, b) + P(b, a) = 1 and a tie P(a, a) = 0.5."""
    p = preference(PROMPTS, images_a, images_b)
    assert p.dtype == torch.float32 and p.shape == (len(PROMPTS),)
    torch.testing.assert_close(p, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(p + preference(PROMPTS, images_b, images_a), torch.ones(len(PROMPTS)), atol=1e-6, rtol=0)
    torch.testing.assert_close(preference(PROMPTS, images_a, images_a), torch.full((len(PROMPTS),), 0.5))


def test_pickscore_preference_is_the_softmax_of_the_two_scores(tiny_pickscore, monkeypatch):
    model_dir, processor_dir = tiny_pickscore
    options = dict(pickscore_model=str(model_dir), pickscore_processor=str(processor_dir), batch_size=2)
    images_a, images_b = smooth_images(len(PROMPTS), 256, 256, seed=4), smooth_images(len(PROMPTS), 256, 256, seed=5)
    reward = make_reward_fn("pickscore", **options)
    scores = torch.stack([reward(images_a, PROMPTS), reward(images_b, PROMPTS)], dim=1)
    # One model serves both: the preference is built from the reward's loaded CLIP, without loading another.
    monkeypatch.setattr(CLIPModel, "from_pretrained", lambda *a, **k: pytest.fail("the CLIP model was loaded twice"))
    preference = make_preference_fn("pickscore", **options)
    check_pairwise(preference, images_a, images_b, torch.softmax(scores.double(), dim=1)[:, 0].float())


def test_hpsv2_preference_scales_the_cosines_by_the_hps_logit_scale(tiny_open_clip):
    _, checkpoint, model = tiny_open_clip
    options = dict(hpsv2_model=TINY_OPEN_CLIP, hpsv2_checkpoint=str(checkpoint))
    images_a, images_b = smooth_images(len(PROMPTS), 224, 224, seed=6), smooth_images(len(PROMPTS), 224, 224, seed=7)
    # HPS's forward by hand (square images: the letterbox is a plain normalisation), its logits = scale * cos.
    tokenizer = open_clip.get_tokenizer(TINY_OPEN_CLIP)
    with torch.no_grad():
        text = F.normalize(model.encode_text(tokenizer(PROMPTS)), dim=-1)
        logits = [model.logit_scale.exp() * (F.normalize(model.encode_image(TF.normalize(
            images, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)), dim=-1) * text).sum(-1)
            for images in (images_a, images_b)]
    assert model.logit_scale.exp() > 10  # open_clip's init, log(1 / 0.07): the scale changes the probabilities a lot
    expected = torch.softmax(torch.stack(logits, dim=1).double(), dim=1)[:, 0].float()
    check_pairwise(make_preference_fn("hpsv2", **options), images_a, images_b, expected)
