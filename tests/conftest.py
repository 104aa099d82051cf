"""Shared fixtures: tiny random pipelines (LCM, SD3, FLUX, SD 1.5, SDXL) and causal LMs saved with `save_pretrained` and
loaded the way a user's model is."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, LatentConsistencyModelPipeline, LCMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from rebel_diffusion.tokenizer import build_clip_tokenizer

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

# Tiny models gain nothing from intra-op threads, and two busy threads per process on 2 cores thrash badly.
torch.set_num_threads(1)


def tiny_clip_config(tokenizer, **options) -> CLIPTextConfig:
    """A 2-layer, 32-wide CLIP text encoder's config over `tokenizer`'s vocabulary (16 positions)."""
    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=16, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **options,
    )


def tiny_unet(**options) -> UNet2DConditionModel:
    """A 2-level UNet on 8x8x4 latents with one cross-attention level."""
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8, norm_num_groups=8, **options,
    )


def tiny_vae(latent_channels: int = 4, **options) -> AutoencoderKL:
    """A 3-level VAE: 32 px images to 8x8 latents."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(16, 32, 32),
        layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        norm_num_groups=8, sample_size=32, **options,
    )


def build_tiny_pipeline(tokenizer_dir: Path, seed: int = 0) -> LatentConsistencyModelPipeline:
    """Random components small enough for CPU tests: 32 px images, 8x8x4 latents, a 2-layer text encoder."""
    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer(tokenizer_dir, model_max_length=16)
    text_encoder = CLIPTextModel(tiny_clip_config(tokenizer))
    unet = tiny_unet(cross_attention_dim=32, time_cond_proj_dim=32)
    vae = tiny_vae()
    scheduler = LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False)
    return LatentConsistencyModelPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def build_tiny_sd3_pipeline(tokenizer_dir: Path, seed: int = 0):
    """A random SD3-style pipeline without T5 (`text_encoder_3=None`): two 2-layer CLIP encoders with projections, a
    2-layer `SD3Transformer2DModel`, a 16-channel VAE (32 px images, 8x8x16 latents) and a shifted flow scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer(tokenizer_dir, model_max_length=16)

    text_encoder, text_encoder_2 = (CLIPTextModelWithProjection(tiny_clip_config(tokenizer, projection_dim=32))
                                    for _ in range(2))
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64,
        pos_embed_max_size=16,
    )
    vae = tiny_vae(16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer, text_encoder_3=None, tokenizer_3=None,
    )


def build_t5_tokenizer(max_length: int = 16):
    """A character-level T5 (Unigram) tokenizer built in memory: T5's <pad> = 0, </s> = 1, <unk> = 2, no sentinels."""
    import string

    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in string.ascii_lowercase + string.digits]
    pieces += [("\u2581" + c, -2.5) for c in string.ascii_lowercase]  # a word's first letter
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


def build_tiny_flux_pipeline(tokenizer_dir: Path, seed: int = 0, guidance_embeds: bool = True):
    """A random FLUX.1-style `FluxPipeline`: a 2-layer CLIP encoder (its 32-d pooled output), a 2-layer T5 encoder (its
    32-d sequence), a `FluxTransformer2DModel` with one double- and one single-stream block on 64-channel tokens (2x2
    patches of 8x8x16 latents), the guidance embedding of FLUX.1-dev, a 16-channel VAE with FLUX's scaling and shift
    factors (32 px images) and FLUX.1-dev's dynamically shifted flow scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = build_clip_tokenizer(tokenizer_dir, model_max_length=16), build_t5_tokenizer()
    text_encoder = CLIPTextModel(tiny_clip_config(tokenizer))
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_2), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ))
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=guidance_embeds, axes_dims_rope=(4, 6, 6),
    )
    vae = tiny_vae(16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)


# The noise schedule of SD 1.5 and SDXL base, with the schedulers their folders ship (the DDIM policy replaces them).
SD_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                   set_alpha_to_one=False, clip_sample=False)


def build_tiny_sd_pipeline(tokenizer_dir: Path, seed: int = 0):
    """A random SD 1.5-style `StableDiffusionPipeline` (PNDM scheduler, no safety checker): 32 px, 8x8x4 latents."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer(tokenizer_dir, model_max_length=16)
    text_encoder = CLIPTextModel(tiny_clip_config(tokenizer))
    unet, vae = tiny_unet(cross_attention_dim=32), tiny_vae()
    scheduler = PNDMScheduler.from_config({**SD_SCHEDULE, "skip_prk_steps": True})
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def build_tiny_sdxl_pipeline(tokenizer_dir: Path, seed: int = 0, second_encoder: bool = True):
    """A random `StableDiffusionXLPipeline` (Euler scheduler, as SDXL base ships): a `CLIPTextModel` and a
    `CLIPTextModelWithProjection` (its 32-d pooled output and both 32-d contexts, concatenated to 64), a UNet with the
    text-time embedding of the pooled embedding and the 6 size/crop ids. Without `second_encoder`, the second
    encoder and tokenizer are None (a folder the policy must refuse)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer(tokenizer_dir, model_max_length=16)
    text_encoder = CLIPTextModel(tiny_clip_config(tokenizer))
    text_encoder_2 = CLIPTextModelWithProjection(tiny_clip_config(tokenizer, projection_dim=32))
    unet = tiny_unet(cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=8,
                     projection_class_embeddings_input_dim=6 * 8 + 32)
    scheduler = EulerDiscreteScheduler.from_config({**SD_SCHEDULE, "timestep_spacing": "leading"})
    return StableDiffusionXLPipeline(
        vae=tiny_vae(scaling_factor=0.13025), text_encoder=text_encoder, text_encoder_2=text_encoder_2 if second_encoder
        else None, tokenizer=tokenizer, tokenizer_2=tokenizer if second_encoder else None, unet=unet,
        scheduler=scheduler, add_watermarker=False,
    )


def save_pipeline(root: Path, build, **options) -> Path:
    """`build(tokenizer folder, **options).save_pretrained(root / "pipeline")`; returns that folder."""
    build(root / "tokenizer-src", **options).save_pretrained(root / "pipeline")
    return root / "pipeline"


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random SD 1.5-style pipeline folder, as `save_pretrained` writes it."""
    return save_pipeline(tmp_path_factory.mktemp("tiny-sd"), build_tiny_sd_pipeline)


@pytest.fixture(scope="session")
def tiny_sdxl_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random SDXL pipeline folder with both text encoders, as `save_pretrained` writes it."""
    return save_pipeline(tmp_path_factory.mktemp("tiny-sdxl"), build_tiny_sdxl_pipeline)


@pytest.fixture(scope="session")
def tiny_sd3_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random SD3 pipeline folder without T5, as `save_pretrained` writes it."""
    return save_pipeline(tmp_path_factory.mktemp("tiny-sd3"), build_tiny_sd3_pipeline)


@pytest.fixture(scope="session")
def tiny_flux_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random FLUX.1-dev-style pipeline folder (guidance embedding, T5), as `save_pretrained` writes it."""
    return save_pipeline(tmp_path_factory.mktemp("tiny-flux"), build_tiny_flux_pipeline)


@pytest.fixture(scope="session")
def tiny_lcm_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random LCM pipeline folder, as `save_pretrained` writes it."""
    return save_pipeline(tmp_path_factory.mktemp("tiny-lcm"), build_tiny_pipeline)


# ---- Tiny causal LMs for the text policy and text rewards ----

TEXT_CHARS = list("abcdefgh 0123456789+=")
TEXT_SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]


def build_char_tokenizer(pad: bool = True, chat_template: str | None = None):
    """A character-level `PreTrainedTokenizerFast` (BOS prepended; no pad token when `pad` is False)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(TEXT_SPECIALS + TEXT_CHARS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
        pad_token="<pad>" if pad else None,
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def build_tiny_causal_lm(arch: str, tokenizer, seed: int = 0):
    """A random 2-layer GPT-2 or Llama causal LM over `tokenizer`'s vocabulary, without dropout."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    if arch == "gpt2":
        config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=4,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids)
        return GPT2LMHeadModel(config)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False, **ids)
    return LlamaForCausalLM(config)


def save_tiny_causal_lm(directory: Path, arch: str, pad: bool = True, chat_template: str | None = None) -> Path:
    """Build a tiny random causal LM plus tokenizer and `save_pretrained` both into `directory`."""
    tokenizer = build_char_tokenizer(pad=pad, chat_template=chat_template)
    build_tiny_causal_lm(arch, tokenizer).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session", params=["gpt2", "llama"])
def tiny_causal_lm_path(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random GPT-2 or Llama causal LM folder with its tokenizer, as `save_pretrained` writes them."""
    return save_tiny_causal_lm(tmp_path_factory.mktemp(f"tiny-{request.param}"), request.param)
