"""The LAION aesthetic predictor (Schuhmann 2022) as a reward, scored on tensors on the accelerator.

The predictor is a linear-only MLP head (`sac+logos+ava1-l14-linearMSE.pth`) on L2-normalised OpenAI CLIP ViT-L/14
image embeddings, trained to regress human 1-10 aesthetic ratings. Public implementations score through PIL or a
CPU-side processor; here the CLIP preprocessing (short side to 224 bicubic, centre crop, mean/std) runs as batched
torch ops on the images' device.

Precision: the CLIP vision tower runs in the requested dtype using open_clip's own mixed-precision recipe (bf16/fp16
weights, LayerNorm in fp32). The embedding is normalised and the head (0.9 M parameters, negligible cost) runs in fp32,
so the only low-precision error is the embedding's.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import tempfile
import urllib.request
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rebel_diffusion.rewards import RewardFn, RewardSetupError, register_reward

HEAD_FILENAME = "sac+logos+ava1-l14-linearMSE.pth"
HEAD_URL = f"https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/{HEAD_FILENAME}"
HEAD_SHA256 = "21dd590f3ccdc646f0d53120778b296013b096a035a2718c9cb0d511bff0f1e0"
HEAD_SIZE_BYTES = 3_714_759

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_PRECISIONS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_HEAD_HINT = f"download {HEAD_URL} and set --config.reward.head_path=/path/to/{HEAD_FILENAME}"
_CLIP_HINT = (
    "to run offline, save the open_clip checkpoint (open_clip_model.safetensors from "
    "https://huggingface.co/timm/vit_large_patch14_clip_224.openai) and set "
    "--config.reward.clip_pretrained=/path/to/open_clip_model.safetensors"
)


class AestheticWeightsError(RewardSetupError):
    """The aesthetic head or CLIP weights are missing, unreachable or corrupt; the message says how to fix it."""


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def sha256_of(path: str | os.PathLike) -> str:
    """Hex SHA-256 digest of the file at `path`."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_dir() -> Path:
    """`$XDG_CACHE_HOME/rebel_diffusion`, defaulting to `~/.cache/rebel_diffusion`."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rebel_diffusion"


def _download_head(dest: Path) -> None:
    """Download the published head to `dest`, verified, through a temporary file so that a partial or concurrent
    download never leaves a broken file at `dest`."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(HEAD_URL, timeout=60) as response:
                while block := response.read(1 << 20):
                    out.write(block)
        except (OSError, http.client.HTTPException) as e:
            raise AestheticWeightsError(f"cannot download the aesthetic head ({_one_line(e)}); {_HEAD_HINT}") from None
        digest = sha256_of(tmp)
        if digest != HEAD_SHA256:
            raise AestheticWeightsError(
                f"downloaded aesthetic head has sha256 {digest}, expected {HEAD_SHA256}; {_HEAD_HINT}"
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def resolve_head_path(head_path: str | os.PathLike | None = None) -> Path:
    """Path of a verified copy of the head weights: `head_path`, or the cached download when it is None (downloaded
    once from `HEAD_URL`). Raises `AestheticWeightsError` if the file is missing, unreachable or fails the hash
    check."""
    if head_path is None:
        path = cache_dir() / HEAD_FILENAME
        if not path.is_file():
            _download_head(path)
    else:
        path = Path(head_path).expanduser()
        if not path.is_file():
            raise AestheticWeightsError(f"aesthetic head weights not found at {path}; {_HEAD_HINT}")
    digest = sha256_of(path)
    if digest != HEAD_SHA256:
        raise AestheticWeightsError(
            f"aesthetic head weights at {path} are corrupt or not the published file "
            f"(sha256 {digest}, expected {HEAD_SHA256}); {_HEAD_HINT}"
        )
    return path


class AestheticHead(nn.Module):
    """The published predictor head: five linear layers with dropout in between and no activations."""

    def __init__(self, embed_dim: int = 768) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(embed_dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Scores `(B, 1)` of L2-normalised CLIP image embeddings `(B, embed_dim)`."""
        return self.layers(embeddings)


def load_aesthetic_head(head_path: str | os.PathLike | None = None) -> AestheticHead:
    """The head with the published weights (see `resolve_head_path`), loaded strictly, in eval mode, on the CPU."""
    head = AestheticHead()
    # The published file holds CUDA tensors, hence map_location.
    state_dict = torch.load(resolve_head_path(head_path), weights_only=True, map_location="cpu")
    head.load_state_dict(state_dict, strict=True)
    return head.eval()


def clip_preprocess(
    images: torch.Tensor,
    size: int = 224,
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN,
    std: tuple[float, ...] = OPENAI_CLIP_STD,
) -> torch.Tensor:
    """CLIP's eval transform on a batch `(B, 3, H, W)` in [0, 1] -> `(B, 3, size, size)` float32, on its device.

    Mirrors open_clip's `Resize(size, bicubic)`, `CenterCrop(size)`, `Normalize(mean, std)` including torchvision's
    output-size and crop-offset rounding. The resize uses `antialias=True`: torch's antialiased bicubic uses PIL's
    kernel (a = -0.5, widened when downsampling), so it matches the PIL pipeline the head was trained behind and does
    not alias when 512-768 px samples are shrunk; the remaining difference is PIL's rounding to uint8.
    """
    height, width = images.shape[-2:]
    short, long = min(height, width), max(height, width)
    new_long = int(size * long / short)
    new_height, new_width = (new_long, size) if width <= height else (size, new_long)
    x = images.float()
    if (new_height, new_width) != (height, width):
        # Bicubic overshoots near edges; PIL saturates to [0, 255], so clamp likewise.
        x = F.interpolate(x, size=(new_height, new_width), mode="bicubic", align_corners=False, antialias=True)
        x = x.clamp(0, 1)
    top, left = int(round((new_height - size) / 2.0)), int(round((new_width - size) / 2.0))
    x = x[..., top : top + size, left : left + size]
    mean_t = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return (x - mean_t) / std_t


def clip_uses_quick_gelu(clip_model: str, clip_pretrained: str) -> bool:
    """Whether `clip_model` with weights `clip_pretrained` needs QuickGELU activations.

    open_clip >= 3 only warns when a QuickGELU tag such as `ViT-L-14`/`openai` is loaded into the GELU architecture,
    which silently changes the embeddings. A tag answers from open_clip's registry; a checkpoint file is taken to hold
    this model's `openai` weights, the ones the head was trained on.
    """
    import open_clip

    tag = "openai" if os.path.isfile(clip_pretrained) else clip_pretrained
    return bool(open_clip.get_pretrained_cfg(clip_model, tag).get("quick_gelu", False))


class AestheticScorer(nn.Module):
    """LAION aesthetic score of images: CLIP image embedding -> L2 normalisation -> published head.

    Frozen and always in eval mode. Calling it on images `(B, 3, H, W)` in [0, 1] (any size, any device) returns
    `(B,)` float32 scores on the images' device, computed without autograd in chunks of `batch_size`.

    Args:
        head_path: local copy of `sac+logos+ava1-l14-linearMSE.pth`; None downloads it once into `cache_dir()`.
        clip_pretrained: open_clip pretrained tag or path of a local open_clip checkpoint file.
        device: device to run on (default CPU).
        dtype: CLIP compute dtype, float32 (default), bfloat16 or float16; the head always runs in float32.
        batch_size: images per forward pass.
        clip_model: open_clip model name; its image embedding must be 768-dimensional like ViT-L-14's.
        quick_gelu: force QuickGELU activations on or off; None decides by `clip_uses_quick_gelu`.
    """

    def __init__(
        self,
        head_path: str | os.PathLike | None = None,
        clip_pretrained: str = "openai",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        batch_size: int = 32,
        clip_model: str = "ViT-L-14",
        quick_gelu: bool | None = None,
    ) -> None:
        super().__init__()
        # Imported here: open_clip takes seconds to import and most users of the reward registry never need it.
        import open_clip

        dtype = torch.float32 if dtype is None else dtype
        if dtype not in _PRECISIONS:
            raise ValueError(f"aesthetic reward: dtype must be one of {list(_PRECISIONS)}, got {dtype}")
        if batch_size < 1:
            raise ValueError(f"aesthetic reward: batch_size must be >= 1, got {batch_size}")
        self.device = torch.device("cpu" if device is None else device)
        self.dtype = dtype
        self.batch_size = batch_size

        # Check the small head first so that a bad head_path fails before a 1.7 GB CLIP download.
        head = load_aesthetic_head(head_path)
        if quick_gelu is None:
            quick_gelu = clip_uses_quick_gelu(clip_model, clip_pretrained)
        try:
            clip = open_clip.create_model(
                clip_model,
                pretrained=clip_pretrained,
                precision=_PRECISIONS[dtype],
                device=self.device,
                force_quick_gelu=quick_gelu,
            )
        except (RuntimeError, OSError) as e:
            raise AestheticWeightsError(
                f"cannot load CLIP {clip_model} weights {clip_pretrained!r} ({_one_line(e)}); {_CLIP_HINT}"
            ) from None
        preprocess_cfg = open_clip.get_model_preprocess_cfg(clip)
        size = preprocess_cfg["size"]
        self.image_size = size if isinstance(size, int) else size[0]
        self.mean = tuple(preprocess_cfg["mean"])
        self.std = tuple(preprocess_cfg["std"])
        # Keep only the vision tower: the text tower (~120 M parameters for ViT-L-14) is never used.
        self.visual = clip.visual
        del clip
        self.head = head.to(self.device)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> AestheticScorer:
        """Stay in eval mode whatever `mode` is, so a parent's `.train()` cannot switch on the head's dropout."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Aesthetic scores `(B,)` float32, on `images`' device, of `images` `(B, 3, H, W)` in [0, 1]."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"aesthetic reward: expected images (B, 3, H, W), got shape {tuple(images.shape)}")
        scores = []
        # Preprocessing per chunk too bounds the memory of full-resolution batches.
        for chunk in images.detach().split(self.batch_size):
            pixels = clip_preprocess(chunk.to(self.device), self.image_size, self.mean, self.std)
            embeddings = self.visual(pixels.to(self.dtype)).float()
            scores.append(self.head(F.normalize(embeddings, dim=-1)).squeeze(-1))
        return torch.cat(scores).to(images.device)


@register_reward("aesthetic")
def aesthetic(
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    head_path: str | os.PathLike | None = None,
    clip_pretrained: str = "openai",
    batch_size: int = 32,
    clip_model: str = "ViT-L-14",
    quick_gelu: bool | None = None,
) -> RewardFn:
    """LAION aesthetic score of each image (prompts are ignored); options as for `AestheticScorer`."""
    scorer = AestheticScorer(
        head_path=head_path,
        clip_pretrained=clip_pretrained,
        device=device,
        dtype=dtype,
        batch_size=batch_size,
        clip_model=clip_model,
        quick_gelu=quick_gelu,
    )
    return lambda images, prompts: scorer(images)
