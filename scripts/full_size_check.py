"""One REBEL epoch of configs/sd35_pickscore_rebel.py on Stable Diffusion 3.5 Medium's full architecture, with random
weights, on the CPU: the real shapes, LoRA targets, memory and code path, without the Hub.

    python scripts/full_size_check.py --out /tmp/sd35m-random      # ~6 GB of bf16 weights written there

The pipeline is built from SD3.5 Medium's published component configs (a 24-layer MMDiT with dual attention in its
first 13 layers and RMS q/k norm; CLIP ViT-L and bigG text encoders; the 16-channel VAE; no T5, which diffusers
allows with `text_encoder_3=None`), seeded, and saved with `save_pretrained` in bf16. Then `train.py` runs one epoch
of the shipped config at 64 px: 2 prompts x 2 samples, the SDE on the first 2 of 4 steps, a cheap reward in place of
PickScore (no Hub). The child's peak resident memory (`ru_maxrss`) and wall time are printed.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build_sd35_medium(out: Path, seed: int = 0) -> None:
    """SD3.5 Medium's architecture with random weights, saved to `out` in bf16."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from rebel_diffusion.tokenizer import build_clip_tokenizer

    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer(out / "tokenizer-src", model_max_length=77)

    def clip(hidden: int, layers: int, heads: int, intermediate: int, act: str) -> CLIPTextModelWithProjection:
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
            num_attention_heads=heads, max_position_embeddings=77, projection_dim=hidden, hidden_act=act,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )).to(torch.bfloat16)

    transformer = SD3Transformer2DModel(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
        pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
    ).to(torch.bfloat16)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
        sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False,
    ).to(torch.bfloat16)
    pipeline = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=clip(768, 12, 12, 3072, "quick_gelu"), tokenizer=tokenizer,
        text_encoder_2=clip(1280, 32, 20, 5120, "gelu"), tokenizer_2=tokenizer, text_encoder_3=None, tokenizer_3=None,
    )
    print(f"transformer: {sum(p.numel() for p in transformer.parameters()) / 1e9:.2f} B parameters", flush=True)
    pipeline.save_pretrained(out / "pipeline")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the random pipeline and the run")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if not (args.out / "pipeline" / "model_index.json").exists():
        start = time.time()
        build_sd35_medium(args.out)
        print(f"built and saved in {time.time() - start:.0f} s", flush=True)
    prompts = args.out / "prompts.txt"
    prompts.write_text("a red circle on a white background\na blue square on a black background\n")
    command = [
        sys.executable, "train.py", "--config", "configs/sd35_pickscore_rebel.py",
        f"--config.model.pretrained={args.out / 'pipeline'}", f"--config.prompt_file={prompts}",
        "--config.resolution=64", "--config.model.num_steps=4", "--config.sample.sde_window=(0,2)",
        "--config.reward.name=jpeg_compressibility", "--config.num_epochs=1", "--config.save_freq=1",
        "--config.sample.batch_size=2", "--config.sample.num_batches_per_epoch=1", "--config.train.batch_size=1",
        "--config.train.gradient_accumulation_steps=2", "--config.sample.decode_batch_size=1", "--config.grid.num_prompts=0",
        f"--config.logdir={args.out / 'runs'}", "--config.run_name=sd35m-random", "--config.log_with=",
    ]
    start = time.time()
    code = subprocess.call(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # kB on Linux
    print(f"train.py exited {code} after {time.time() - start:.0f} s; peak resident memory {peak_gb:.1f} GB")
    return code


if __name__ == "__main__":
    sys.exit(main())
