"""Tests of the LAION aesthetic reward: head weights and their errors, preprocessing, and end-to-end scoring against a
step-by-step open_clip reference, with random CLIP weights (no network)."""

from __future__ import annotations

import io
import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from rebel_diffusion.rewards import available_rewards, make_reward_fn
from rebel_diffusion.rewards.aesthetic import (
    HEAD_FILENAME,
    HEAD_SHA256,
    HEAD_SIZE_BYTES,
    HEAD_URL,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    AestheticHead,
    AestheticScorer,
    AestheticWeightsError,
    clip_preprocess,
    clip_uses_quick_gelu,
    load_aesthetic_head,
    resolve_head_path,
    sha256_of,
)

SHARED_HEAD = Path(__file__).resolve().parents[2] / "shared/assets" / HEAD_FILENAME
CONFIG_KEY = "--config.reward.head_path"
TINY_CLIP = "rebel-test-tiny-vit"
# A 2-layer ViT with ViT-L-14's 768-d embedding and 224 px input, so the real head fits it.
TINY_CLIP_CFG = {
    "embed_dim": 768,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 128, "head_width": 64, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 1000, "width": 64, "heads": 1, "layers": 1},
}


@pytest.fixture(scope="module")
def head_path() -> Path:
    if not SHARED_HEAD.is_file():
        pytest.skip(f"the published aesthetic head is not at {SHARED_HEAD}")
    return SHARED_HEAD


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """A random tiny open_clip model registered under TINY_CLIP, and its weights saved as a checkpoint file."""
    directory = tmp_path_factory.mktemp("tiny_clip")
    (directory / f"{TINY_CLIP}.json").write_text(json.dumps(TINY_CLIP_CFG))
    open_clip.add_model_config(directory / f"{TINY_CLIP}.json")
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_CLIP).eval()
    checkpoint = directory / "tiny_clip.pt"
    torch.save(model.state_dict(), checkpoint)
    return checkpoint, model


@pytest.fixture(scope="module")
def tiny_scorer(head_path: Path, tiny_clip: tuple[Path, torch.nn.Module]) -> AestheticScorer:
    return AestheticScorer(head_path=head_path, clip_pretrained=str(tiny_clip[0]), clip_model=TINY_CLIP, batch_size=4)


def reference_scores(model: torch.nn.Module, head: AestheticHead, images: torch.Tensor) -> torch.Tensor:
    """Step-by-step reference: open_clip encode_image on the preprocessed batch -> L2 normalise -> head."""
    with torch.no_grad():
        embeddings = model.encode_image(clip_preprocess(images))
        return head(F.normalize(embeddings, dim=-1)).squeeze(-1)


def smooth_image(height: int, width: int, seed: int) -> torch.Tensor:
    """A photo-like test image `(1, 3, H, W)` on the uint8 grid: smooth colour regions plus mild noise."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, max(height // 32, 2), max(width // 32, 2), generator=generator)
    image = F.interpolate(coarse, size=(height, width), mode="bilinear")
    image = image + 0.05 * torch.randn(1, 3, height, width, generator=generator)
    return (image.clamp(0, 1) * 255).round() / 255


def assert_clear_error(error: pytest.ExceptionInfo) -> None:
    message = str(error.value)
    assert "\n" not in message
    assert CONFIG_KEY in message and HEAD_URL in message


def test_aesthetic_is_registered() -> None:
    assert "aesthetic" in available_rewards()


def test_real_head_loads_strictly(head_path: Path) -> None:
    assert head_path.stat().st_size == HEAD_SIZE_BYTES
    assert sha256_of(head_path) == HEAD_SHA256
    head = load_aesthetic_head(head_path)
    assert not head.training
    assert sorted(head.state_dict()) == sorted(
        f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")
    )
    embeddings = F.normalize(torch.randn(8, 768, generator=torch.Generator().manual_seed(0)), dim=-1)
    with torch.no_grad():
        scores = head(embeddings).squeeze(-1)
        # No activations: the head is one affine map, the product of its linear layers.
        weight, bias = torch.eye(768), torch.zeros(768)
        for layer in head.layers:
            if isinstance(layer, torch.nn.Linear):
                weight, bias = layer.weight @ weight, layer.weight @ bias + layer.bias
    assert torch.isfinite(scores).all()
    torch.testing.assert_close(scores, (embeddings @ weight.T + bias).squeeze(-1), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("damage", ["truncate", "flip_byte"])
def test_corrupt_head_is_a_clear_error(head_path: Path, tmp_path: Path, damage: str) -> None:
    data = bytearray(head_path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0xFF
    corrupt = tmp_path / HEAD_FILENAME
    corrupt.write_bytes(bytes(data))
    with pytest.raises(AestheticWeightsError, match="sha256") as error:
        load_aesthetic_head(corrupt)
    assert_clear_error(error)


def test_missing_head_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(AestheticWeightsError, match="not found") as error:
        resolve_head_path(tmp_path / "absent.pth")
    assert_clear_error(error)


def test_download_without_network_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    with pytest.raises(AestheticWeightsError, match="cannot download") as error:
        resolve_head_path(None)
    assert_clear_error(error)
    assert list((tmp_path / "rebel_diffusion").iterdir()) == []


def test_download_of_wrong_bytes_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(urllib.request, "urlopen", lambda *args, **kwargs: io.BytesIO(b"<html>rate limited</html>"))
    with pytest.raises(AestheticWeightsError, match="sha256") as error:
        resolve_head_path(None)
    assert_clear_error(error)
    assert list((tmp_path / "rebel_diffusion").iterdir()) == []


def test_download_is_cached_and_verified(head_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    urls = []

    def fake_urlopen(url: str, timeout: float) -> io.BytesIO:
        urls.append(url)
        return io.BytesIO(head_path.read_bytes())

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    first, second = resolve_head_path(None), resolve_head_path(None)
    assert first == second == tmp_path / "rebel_diffusion" / HEAD_FILENAME
    assert urls == [HEAD_URL]
    assert list(first.parent.iterdir()) == [first]
    assert sha256_of(first) == HEAD_SHA256


def test_quick_gelu_follows_the_pretrained_tag(tiny_clip: tuple[Path, torch.nn.Module]) -> None:
    assert clip_uses_quick_gelu("ViT-L-14", "openai")
    assert not clip_uses_quick_gelu("ViT-L-14", "laion2b_s32b_b82k")
    # A checkpoint file for ViT-L-14 is taken to hold the OpenAI weights the head was trained on.
    assert clip_uses_quick_gelu("ViT-L-14", str(tiny_clip[0]))
    assert not clip_uses_quick_gelu(TINY_CLIP, str(tiny_clip[0]))


def test_bad_clip_weights_are_a_clear_error(head_path: Path) -> None:
    with pytest.raises(AestheticWeightsError, match="clip_pretrained") as error:
        AestheticScorer(head_path=head_path, clip_pretrained="/nonexistent/clip.safetensors", clip_model=TINY_CLIP)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("height, width", [(300, 400), (64, 64), (768, 768), (513, 389)])
def test_preprocessing_matches_open_clip_pil_transform(height: int, width: int) -> None:
    """Equal to open_clip's PIL eval transform up to PIL's uint8 rounding and clipping between its two resize passes:
    at most 0.05 in normalised units (about 3.4/255 in pixel values), 0.006 on average."""
    image = smooth_image(height, width, seed=height + width)
    pil_image = Image.fromarray(np.ascontiguousarray((image[0] * 255).round().byte().permute(1, 2, 0).numpy()))
    expected = open_clip.image_transform(224, is_train=False, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)(pil_image)
    ours = clip_preprocess(image)[0]
    assert ours.shape == expected.shape == (3, 224, 224)
    difference = (ours - expected).abs()
    assert difference.max() <= 0.05
    assert difference.mean() <= 0.006


def test_scorer_matches_step_by_step_reference(
    tiny_scorer: AestheticScorer, tiny_clip: tuple[Path, torch.nn.Module]
) -> None:
    images = torch.rand(6, 3, 240, 320, generator=torch.Generator().manual_seed(1))
    scores = tiny_scorer(images)
    assert scores.shape == (6,) and scores.dtype == torch.float32
    torch.testing.assert_close(scores, reference_scores(tiny_clip[1], tiny_scorer.head, images), atol=1e-5, rtol=1e-5)
    assert scores.std() > 0


def test_scorer_is_frozen_and_keeps_no_text_tower(tiny_scorer: AestheticScorer) -> None:
    images = torch.rand(3, 3, 224, 224, generator=torch.Generator().manual_seed(2), requires_grad=True)
    tiny_scorer.train()
    assert not any(module.training for module in tiny_scorer.modules())
    assert not any(parameter.requires_grad for parameter in tiny_scorer.parameters())
    scores = tiny_scorer(images)
    assert not scores.requires_grad
    torch.testing.assert_close(scores, tiny_scorer(images), atol=0, rtol=0)
    assert all(name.startswith(("visual.", "head.")) for name, _ in tiny_scorer.named_parameters())


@pytest.mark.parametrize("height, width", [(64, 64), (768, 768), (200, 120), (96, 512)])
def test_scorer_accepts_any_size(
    tiny_scorer: AestheticScorer, tiny_clip: tuple[Path, torch.nn.Module], height: int, width: int
) -> None:
    images = torch.rand(2, 3, height, width, generator=torch.Generator().manual_seed(height * width))
    scores = tiny_scorer(images)
    assert scores.shape == (2,) and torch.isfinite(scores).all()
    torch.testing.assert_close(scores, reference_scores(tiny_clip[1], tiny_scorer.head, images), atol=1e-5, rtol=1e-5)


def test_chunking_does_not_change_scores(tiny_scorer: AestheticScorer) -> None:
    images = torch.rand(7, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    assert tiny_scorer.batch_size < len(images)
    chunked = tiny_scorer(images)
    tiny_scorer.batch_size = len(images)
    try:
        whole = tiny_scorer(images)
    finally:
        tiny_scorer.batch_size = 4
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)


def test_bf16_agrees_with_fp32(
    head_path: Path, tiny_clip: tuple[Path, torch.nn.Module], tiny_scorer: AestheticScorer
) -> None:
    """bf16 CLIP with an fp32 head is within 0.03 of fp32 (measured max 0.007 on scores near 4.7)."""
    bf16_scorer = AestheticScorer(
        head_path=head_path, clip_pretrained=str(tiny_clip[0]), clip_model=TINY_CLIP, dtype=torch.bfloat16
    )
    assert bf16_scorer.visual.conv1.weight.dtype == torch.bfloat16
    images = torch.rand(8, 3, 256, 256, generator=torch.Generator().manual_seed(4))
    scores = bf16_scorer(images)
    assert scores.dtype == torch.float32
    assert (scores - tiny_scorer(images)).abs().max() <= 0.03


def test_factory_builds_the_scorer(
    head_path: Path, tiny_clip: tuple[Path, torch.nn.Module], tiny_scorer: AestheticScorer
) -> None:
    reward_fn = make_reward_fn(
        "aesthetic", head_path=str(head_path), clip_pretrained=str(tiny_clip[0]), clip_model=TINY_CLIP, batch_size=3
    )
    images = torch.rand(5, 3, 128, 128, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(reward_fn(images, ["a prompt"] * 5), tiny_scorer(images), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_vit_l_14_matches_step_by_step_reference(head_path: Path, tmp_path: Path) -> None:
    """The real ViT-L-14 architecture (QuickGELU, as the OpenAI weights need) with random weights from a checkpoint."""
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-L-14", force_quick_gelu=True).eval()
    checkpoint = tmp_path / "vit_l_14_random.pt"
    torch.save(model.state_dict(), checkpoint)
    scorer = AestheticScorer(head_path=head_path, clip_pretrained=str(checkpoint), batch_size=2)
    checkpoint.unlink()
    assert any(isinstance(module, open_clip.transformer.QuickGELU) for module in scorer.visual.modules())
    images = torch.rand(2, 3, 512, 512, generator=torch.Generator().manual_seed(6))
    start = time.perf_counter()
    scores = scorer(images)
    print(f"ViT-L-14 aesthetic scoring on CPU: {(time.perf_counter() - start) / len(images):.2f} s per image")
    torch.testing.assert_close(scores, reference_scores(model, scorer.head, images), atol=1e-4, rtol=1e-4)
