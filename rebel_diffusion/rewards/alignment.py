"""Prompt-image alignment and human-preference rewards built on CLIP: PickScore, CLIP score and HPS v2.1.

Each scores images `(B, 3, H, W)` in [0, 1] against their prompts with a CLIP-style dual encoder, the way its authors
compute it, but with the image preprocessing done as batched torch ops on the images' device (no PIL round trip):

* `pickscore` (Kirstain et al. 2023): a CLIP ViT-H/14 fine-tuned on Pick-a-Pic preferences, in transformers.
  Score = `logit_scale.exp() * cos(image_embeds, text_embeds)`, about 18-23 for typical images (logit_scale.exp() is
  ~100 in the published checkpoint).
* `clip_score`: the plain cosine similarity `cos(image, prompt)` in [-1, 1] of an open_clip model (default LAION's
  ViT-H-14). Not Hessel et al.'s CLIPScore `2.5 * max(cos, 0)`: the clamp only matters for cosines below 0, which
  matched prompt-image pairs hardly reach, and the unscaled cosine keeps the reward on the same scale as `hpsv2`, so
  weights in a weighted reward spec compare directly. Multiply by 2.5 (a weight) to read it as CLIPScore.
* `hpsv2`: Human Preference Score v2.1 (Wu et al. 2023): open_clip ViT-H-14 with the HPS v2.1 weights. Score = cos of
  the normalised image and text features (HPS's `diag(image_features @ text_features.T)`), about 0.25-0.35.

PickScore and HPS v2.1 are also pairwise preferences (`rebel_diffusion.rewards.preference`), as their authors define
them: the softmax over the two images of `logit_scale.exp() * cos`, i.e. `P(a beats b) = sigmoid(s_a - s_b)` with `s`
that scaled score (PickScore's reward already is; HPS's is its cosine times its own model's `logit_scale.exp()`). A
reward and a preference on the same weights share one loaded model (`shared_scorer`).

The text embeddings of each distinct prompt are computed once and cached: training reuses a fixed prompt pool.
Precision: the towers run in the requested dtype (open_clip's own recipe for open_clip models); cosines and the final
scale are computed in float32.
"""

from __future__ import annotations

import functools
import os
import pickle
from typing import Any, Callable

import torch
import torch.nn.functional as F

from rebel_diffusion.rewards import RewardFn, RewardSetupError, register_reward
from rebel_diffusion.rewards.aesthetic import clip_preprocess
from rebel_diffusion.rewards.preference import PreferenceFn, register_preference

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
CLIP_SCORE_MODEL = "ViT-H-14"
CLIP_SCORE_PRETRAINED = "laion2b_s32b_b79k"
HPSV2_MODEL = "ViT-H-14"
HPSV2_REPO = "xswu/HPSv2"
HPSV2_FILENAME = "HPS_v2.1_compressed.pt"

_PRECISIONS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:300] or type(error).__name__


def _check_dtype(name: str, dtype: torch.dtype | None) -> torch.dtype:
    dtype = torch.float32 if dtype is None else dtype
    if dtype not in _PRECISIONS:
        raise ValueError(f"{name} reward: dtype must be one of {list(_PRECISIONS)}, got {dtype}")
    return dtype


def _check_images(name: str, images: torch.Tensor, prompts: list[str]) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"{name} reward: expected images (B, 3, H, W), got shape {tuple(images.shape)}")
    if len(prompts) != len(images):
        raise ValueError(f"{name} reward: {len(images)} images but {len(prompts)} prompts")


def letterbox_preprocess(
    images: torch.Tensor, size: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> torch.Tensor:
    """HPS's eval transform (open_clip's `ResizeMaxSize`) on a batch `(B, 3, H, W)` in [0, 1] -> `(B, 3, size, size)`.

    The longer side is resized to `size` (bicubic, antialiased, clamped like PIL's uint8 output), the shorter one padded
    with black centred, then mean/std normalised. For square images this is a plain resize.
    """
    height, width = images.shape[-2:]
    scale = size / max(height, width)
    new_height, new_width = round(height * scale), round(width * scale)
    x = images.float()
    if (new_height, new_width) != (height, width):
        x = F.interpolate(x, size=(new_height, new_width), mode="bicubic", align_corners=False, antialias=True)
        x = x.clamp(0, 1)
    pad_h, pad_w = size - new_height, size - new_width
    x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)
    mean_t = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return (x - mean_t) / std_t


def _size_field(size: Any, key: str) -> int | None:
    """`key` of an image processor's size setting: a dict, a transformers `SizeDict`, or a bare int (every side)."""
    if isinstance(size, int):
        return size
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


class _PromptCache:
    """Unit-norm text embeddings per distinct prompt, computed by `encode(prompts) -> (N, D)` on first sight."""

    def __init__(self, encode: Any) -> None:
        self._encode = encode
        self._cache: dict[str, torch.Tensor] = {}

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        new = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if new:
            embeddings = F.normalize(self._encode(new).float(), dim=-1)
            self._cache.update(zip(new, embeddings))
        return torch.stack([self._cache[p] for p in prompts])


class PickScorer:
    """PickScore of images against their prompts: `logit_scale.exp() * cos(image_embeds, text_embeds)`, `(B,)` float32.

    Args:
        model: a transformers `CLIPModel` (Hub id or folder), by default PickScore v1.
        processor: the `CLIPProcessor` whose tokenizer and image settings (size, mean, std) go with it.
        device, dtype: where and in which precision the CLIP towers run.
        batch_size: images per forward pass.
    """

    def __init__(
        self,
        model: str = PICKSCORE_MODEL,
        processor: str = PICKSCORE_PROCESSOR,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        batch_size: int = 16,
    ) -> None:
        from transformers import AutoProcessor, CLIPModel

        self.dtype = _check_dtype("pickscore", dtype)
        self.device = torch.device("cpu" if device is None else device)
        self.batch_size = batch_size
        try:
            loaded_processor = AutoProcessor.from_pretrained(processor)
        except (OSError, ValueError) as e:
            raise RewardSetupError(f"pickscore: cannot load the processor {processor!r} ({_one_line(e)})") from None
        try:
            self.model = CLIPModel.from_pretrained(model, dtype=self.dtype).to(self.device).eval().requires_grad_(False)
        except (OSError, ValueError) as e:
            raise RewardSetupError(f"pickscore: cannot load the CLIP model {model!r} ({_one_line(e)})") from None
        self.tokenizer = loaded_processor.tokenizer
        image_processor = loaded_processor.image_processor
        crop_height, crop_width = _size_field(image_processor.crop_size, "height"), _size_field(image_processor.crop_size, "width")
        short_edge = _size_field(image_processor.size, "shortest_edge")
        if not crop_height or not (crop_height == crop_width == short_edge):
            raise RewardSetupError(f"pickscore: processor {processor!r} resizes to {image_processor.size} and crops to "
                                   f"{image_processor.crop_size}; only CLIP's resize-then-crop to one square size is "
                                   "supported")
        self.image_size = int(crop_height)
        self.mean, self.std = tuple(image_processor.image_mean), tuple(image_processor.image_std)
        self.max_length = self.model.config.text_config.max_position_embeddings
        self._text = _PromptCache(self._encode_text)

    def _encode_text(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(prompts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        pooled = self.model.text_model(input_ids=tokens["input_ids"].to(self.device),
                                       attention_mask=tokens["attention_mask"].to(self.device)).pooler_output
        return self.model.text_projection(pooled)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        _check_images("pickscore", images, prompts)
        text = self._text(list(prompts))
        scores = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size].detach().to(self.device)
            pixels = clip_preprocess(chunk, self.image_size, self.mean, self.std).to(self.dtype)
            pooled = self.model.vision_model(pixel_values=pixels).pooler_output
            image = F.normalize(self.model.visual_projection(pooled).float(), dim=-1)
            scores.append((image * text[start : start + len(chunk)]).sum(dim=-1))
        return (self.model.logit_scale.float().exp() * torch.cat(scores)).to(images.device)


class OpenCLIPScorer:
    """Cosine similarity `(B,)` float32 of open_clip image and prompt features.

    Args:
        model: open_clip model name.
        pretrained: open_clip pretrained tag or checkpoint file for `open_clip.create_model`; None for no weights (then
            `state_dict_file` must supply them).
        state_dict_file: a `torch.save`d dict whose `state_dict` entry (HPS's format) is loaded over the model strictly.
        letterbox: preprocess like HPS (longest side resized, padded square) instead of CLIP's resize and centre crop.
        device, dtype: where and in which precision (open_clip's recipe) the towers run.
        batch_size: images per forward pass.
        name: the reward's name, for error messages.
    """

    def __init__(
        self,
        model: str,
        pretrained: str | None,
        state_dict_file: str | os.PathLike | None = None,
        letterbox: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        batch_size: int = 16,
        name: str = "clip_score",
    ) -> None:
        import open_clip

        self.name = name
        self.dtype = _check_dtype(name, dtype)
        self.device = torch.device("cpu" if device is None else device)
        self.batch_size = batch_size
        self.letterbox = letterbox
        try:
            clip = open_clip.create_model(model, pretrained=pretrained, precision=_PRECISIONS[self.dtype],
                                          device=self.device)
            self.tokenizer = open_clip.get_tokenizer(model)
        except (RuntimeError, OSError, ValueError) as e:
            raise RewardSetupError(f"{name}: cannot load open_clip {model} with weights {pretrained!r} "
                                   f"({_one_line(e)})") from None
        if state_dict_file is not None:
            _load_state_dict_file(clip, state_dict_file, name)
        self.model = clip.eval().requires_grad_(False)
        preprocess_cfg = open_clip.get_model_preprocess_cfg(clip)
        size = preprocess_cfg["size"]
        self.image_size = size if isinstance(size, int) else size[0]
        self.mean, self.std = tuple(preprocess_cfg["mean"]), tuple(preprocess_cfg["std"])
        self._text = _PromptCache(lambda prompts: self.model.encode_text(self.tokenizer(prompts).to(self.device)))

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        _check_images(self.name, images, prompts)
        text = self._text(list(prompts))
        preprocess = letterbox_preprocess if self.letterbox else clip_preprocess
        scores = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size].detach().to(self.device)
            pixels = preprocess(chunk, self.image_size, self.mean, self.std).to(self.dtype)
            image = F.normalize(self.model.encode_image(pixels).float(), dim=-1)
            scores.append((image * text[start : start + len(chunk)]).sum(dim=-1))
        return torch.cat(scores).to(images.device)


def _load_state_dict_file(model: torch.nn.Module, path: str | os.PathLike, name: str) -> None:
    """Load `torch.load(path)["state_dict"]` (or a bare state dict) into `model` strictly; `RewardSetupError` if not."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:
        raise RewardSetupError(f"{name}: cannot read the checkpoint {str(path)!r} ({_one_line(e)})") from None
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise RewardSetupError(f"{name}: {str(path)!r} holds no state dict")
    # Checkpoints saved from a DistributedDataParallel wrapper prefix every key with "module.".
    state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise RewardSetupError(f"{name}: the checkpoint {str(path)!r} does not fit the model ({_one_line(e)})") from None


def resolve_hpsv2_checkpoint(checkpoint: str | os.PathLike | None) -> str:
    """A local HPS v2.1 checkpoint: `checkpoint` when given (it must exist), else `HPSV2_FILENAME` from the Hub repo
    `HPSV2_REPO`, downloaded once into the Hugging Face cache."""
    if checkpoint is not None:
        if not os.path.isfile(checkpoint):
            raise RewardSetupError(f"hpsv2: checkpoint {str(checkpoint)!r} not found")
        return str(checkpoint)
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(HPSV2_REPO, HPSV2_FILENAME)
    except Exception as e:  # noqa: BLE001 - the hub raises many network and HTTP error types; all mean the same here
        raise RewardSetupError(f"hpsv2: cannot download {HPSV2_FILENAME} from {HPSV2_REPO} ({_one_line(e)}); download "
                               "it and set --config.reward.hpsv2_checkpoint=/path/to/it") from None


_SCORERS: dict[tuple, Any] = {}


def shared_scorer(cls: type, **kwargs: Any) -> Any:
    """`cls(**kwargs)`, built once per class and arguments: PickScore as the training reward and as the win-rate
    preference (or HPS as both) is one model in memory, not two multi-GB copies."""
    key = (cls, tuple(sorted((k, str(v)) for k, v in kwargs.items())))
    if key not in _SCORERS:
        _SCORERS[key] = cls(**kwargs)
    return _SCORERS[key]


def _pairwise_softmax(score: Any, scale: float) -> PreferenceFn:
    """The two-image softmax `P(a beats b) = sigmoid(scale * (score(a) - score(b)))` of a scorer `score(images,
    prompts)`; both sides are scored in one call."""

    def preference_fn(prompts: list[str], images_a: torch.Tensor, images_b: torch.Tensor) -> torch.Tensor:
        if images_a.shape != images_b.shape:
            raise ValueError(f"the two sides' images differ in shape: {tuple(images_a.shape)} and "
                             f"{tuple(images_b.shape)}")
        scores = score(torch.cat([images_a, images_b]), list(prompts) * 2)
        scores_a, scores_b = scores[: len(prompts)], scores[len(prompts) :]
        return torch.sigmoid(scale * (scores_a - scores_b))

    return preference_fn


@register_reward("pickscore", kind="image")
def pickscore(
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    pickscore_model: str = PICKSCORE_MODEL,
    pickscore_processor: str = PICKSCORE_PROCESSOR,
    batch_size: int = 16,
) -> RewardFn:
    """PickScore v1 of each image for its prompt; options: model and processor (Hub ids or folders)."""
    return shared_scorer(PickScorer, model=pickscore_model, processor=pickscore_processor, device=device, dtype=dtype,
                         batch_size=batch_size)


@register_reward("clip_score", kind="image")
def clip_score(
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    clip_score_model: str = CLIP_SCORE_MODEL,
    clip_score_pretrained: str = CLIP_SCORE_PRETRAINED,
    batch_size: int = 16,
) -> RewardFn:
    """Cosine of open_clip image and prompt embeddings; options: open_clip model name and pretrained tag or file."""
    return OpenCLIPScorer(clip_score_model, clip_score_pretrained, device=device, dtype=dtype, batch_size=batch_size,
                          name="clip_score")


@register_reward("hpsv2", kind="image")
def hpsv2(
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    hpsv2_checkpoint: str | None = None,
    hpsv2_model: str = HPSV2_MODEL,
    batch_size: int = 16,
) -> RewardFn:
    """HPS v2.1 of each image for its prompt; options: a local checkpoint (default: downloaded) and the model name.

    The architecture is built without pretrained weights: the HPS checkpoint replaces every weight, so LAION's ViT-H-14
    (3.9 GB) is never downloaded.
    """
    checkpoint = resolve_hpsv2_checkpoint(hpsv2_checkpoint)
    return shared_scorer(OpenCLIPScorer, model=hpsv2_model, pretrained=None, state_dict_file=checkpoint, letterbox=True,
                         device=device, dtype=dtype, batch_size=batch_size, name="hpsv2")


def _softmax_preference(reward_factory: Callable[..., Any], scale: Callable[[Any], float], doc: str) -> Callable:
    """The preference factory of a scorer reward's factory: its options (its signature, through `functools.wraps`),
    its scorer (`shared_scorer`: the same loaded model), and the two-image softmax of the scores times
    `scale(scorer)`."""

    @functools.wraps(reward_factory)
    def factory(**options: Any) -> PreferenceFn:
        scorer = reward_factory(**options)
        return _pairwise_softmax(scorer, scale(scorer))

    factory.__doc__ = doc
    return factory


register_preference("pickscore", kind="image")(_softmax_preference(
    pickscore, lambda scorer: 1.0,
    "PickScore's published preference of two images for a prompt: the softmax of their scores, which already include "
    "`logit_scale.exp()`; the options are the `pickscore` reward's."))
register_preference("hpsv2", kind="image")(_softmax_preference(
    hpsv2, lambda scorer: scorer.model.logit_scale.detach().float().exp().item(),
    "HPS v2's preference of two images for a prompt: the softmax over the two of `logit_scale.exp() * cos`, with the "
    "HPS model's own (trained) logit_scale; the options are the `hpsv2` reward's."))
