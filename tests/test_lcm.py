import math

import pytest
import torch
from diffusers import LatentConsistencyModelPipeline

from rebel_diffusion.policies.lcm import LORA_TARGETS, LCMPolicy, gaussian_kl, gaussian_log_prob, lcm_step

PROMPTS = ["a red circle on a white background", "a blue square", "a red circle on a white background"]


FP32_UNIT_ROUNDOFF = 2.0**-24  # u: fl(x) = x (1 + d), |d| <= u


def image_rounding_tolerance(modules: list[torch.nn.Module], calls: list[int]) -> float:
    """How far two fp32 computations of the same images may drift apart when they round in different places or orders
    (batch-size-dependent conv/GEMM blocking, a LoRA merged into W against applied beside it): max abs, in [0, 1].

    An fp32 sum of n products differs from its exact value by about sqrt(n) * u * (its magnitude): the probabilistic
    rounding model (Higham & Mary, SIAM J. Sci. Comput. 2019), where the worst case is n * u. Running `modules[i]`
    `calls[i]` times chains L such reductions (every Conv2d and Linear; GroupNorm keeps each at O(1)), whose
    independent errors add in quadrature: sqrt(L). With n the largest fan-in, one computation is off by
    ~ sqrt(n L) u |x| and two differ by at most twice that. The image is clamp(x / 2 + 0.5, 0, 1): only pixels with
    |x| <= 1 can differ at all (the clamp shrinks differences), and the / 2 halves it: the factors cancel, so
    sqrt(n L) u.
    """
    layers = [(layer, count) for module, count in zip(modules, calls) for layer in module.modules()
              if isinstance(layer, (torch.nn.Conv2d, torch.nn.Linear))]
    fan_in = max(layer.in_features if isinstance(layer, torch.nn.Linear)
                 else layer.in_channels // layer.groups * layer.kernel_size[0] * layer.kernel_size[1]
                 for layer, _ in layers)
    depth = sum(count for _, count in layers)
    return math.sqrt(fan_in * depth) * FP32_UNIT_ROUNDOFF


@pytest.fixture
def policy(tiny_lcm_path) -> LCMPolicy:
    return LCMPolicy.from_pretrained(tiny_lcm_path, resolution=32)


def perturb_lora(policy: LCMPolicy, scale: float = 0.05) -> None:
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))


def test_sampler_equals_the_diffusers_pipeline(policy):
    trajectory = policy.sample(PROMPTS, generator=torch.Generator().manual_seed(0))
    reference = policy.pipeline(
        PROMPTS, num_inference_steps=8, guidance_scale=8.0, generator=torch.Generator().manual_seed(0),
        output_type="pt", height=32, width=32,
    ).images
    assert trajectory.outputs.shape == (3, 3, 32, 32)
    # Bit-exact by construction: the LoRA is zero (B = 0), so the merged W + 0 has W's very bits; both run the same
    # kernels on the same shapes (one UNet batch of 3, one decode of 3) and lcm_step does the scheduler's arithmetic.
    assert torch.equal(trajectory.outputs, reference), (trajectory.outputs - reference).abs().max()
    assert trajectory.log_probs.shape == (3, 7)
    assert trajectory.states.shape == (3, 7, 4, 8, 8)
    torch.testing.assert_close(trajectory.states[:, 1:], trajectory.actions[:, :-1])
    assert trajectory.mask.all()


def test_sampler_equals_the_pipeline_with_trained_lora_weights(policy):
    perturb_lora(policy)
    trajectory = policy.sample(PROMPTS[:2], generator=torch.Generator().manual_seed(3))
    reference = policy.pipeline(
        PROMPTS[:2], num_inference_steps=8, guidance_scale=8.0, generator=torch.Generator().manual_seed(3),
        output_type="pt", height=32, width=32,
    ).images
    # The LoRA merged into W (sampling) against peft's x A^T B^T beside x W^T (the pipeline): every one of the 8 UNet
    # calls rounds differently, and the decode carries it to the pixels. Fan-in <= 1152, 8 x 236 + 22 layers:
    # sqrt(1152 * 1910) u = 8.8e-5. Measured 1.2e-6 here, over the old atol 1e-6.
    atol = image_rounding_tolerance([policy.pipeline.unet, policy.vae.post_quant_conv, policy.vae.decoder], [8, 1, 1])
    torch.testing.assert_close(trajectory.outputs, reference, atol=atol, rtol=0)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_recomputed_log_probs_equal_stored(tiny_lcm_path, reduction):
    policy = LCMPolicy.from_pretrained(tiny_lcm_path, resolution=32, logprob_reduction=reduction)
    perturb_lora(policy)
    trajectory = policy.sample(PROMPTS, generator=torch.Generator().manual_seed(1))
    for steps in policy.step_chunks():
        recomputed, kl = policy.log_prob(trajectory, steps)
        assert recomputed.requires_grad and kl is None and recomputed.shape == (len(PROMPTS), 1)
        # Sampling runs the LoRA merged into W, re-scoring unmerged: the UNet outputs differ by fp32 rounding. A "sum"
        # log-prob of a 256-dim latent is ~ -350, where one fp32 ulp is 3e-5: there, allow two ulps of the value.
        torch.testing.assert_close(recomputed.detach(), trajectory.log_probs[:, steps.start : steps.stop], atol=1e-5,
                                   rtol=2.5e-7 if reduction == "sum" else 0)


def test_sum_reduction_is_the_exact_gaussian_density():
    torch.manual_seed(0)
    mean, x, std = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3), torch.tensor(0.7)
    exact = torch.distributions.Normal(mean, std).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(gaussian_log_prob(x, mean, std, "sum"), exact)
    torch.testing.assert_close(gaussian_log_prob(x, mean, std, "mean"), exact / 36)


def test_log_prob_gradient_reaches_only_lora_weights(policy):
    trajectory = policy.sample(PROMPTS[:2], generator=torch.Generator().manual_seed(0))
    policy.log_prob(trajectory, range(3, 4))[0].sum().backward()
    trainable = dict((n, p) for n, p in policy.pipeline.unet.named_parameters() if p.requires_grad)
    assert trainable and all("lora" in n for n in trainable)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values())
    assert not any(p.requires_grad for p in policy.vae.parameters())
    assert not any(p.requires_grad for p in policy.text_encoder.parameters())


def test_lora_targets_rank_and_gaussian_init(policy):
    names = [n for n, p in policy.pipeline.unet.named_parameters() if p.requires_grad]
    targets = {n.split(".lora_")[0].split(".")[-1] for n in names}
    assert targets == {"to_q", "to_k", "to_v", "0"}  # to_out.0 ends in "0"
    assert all(".to_out.0." in n for n in names if ".to_out." in n)
    a = next(p for n, p in policy.pipeline.unet.named_parameters() if "lora_A" in n)
    b = next(p for n, p in policy.pipeline.unet.named_parameters() if "lora_B" in n)
    assert a.shape[0] == 8 and torch.all(b == 0)
    assert 0 < a.std().item() < 1  # gaussian init: A ~ N(0, 1/r)


def test_trainable_weights_stay_float32_under_half_precision(tiny_lcm_path):
    policy = LCMPolicy.from_pretrained(tiny_lcm_path, resolution=32, dtype=torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in policy.trainable_parameters())
    assert policy.vae.dtype == torch.bfloat16 and policy.text_encoder.dtype == torch.bfloat16
    frozen = [p for p in policy.pipeline.unet.parameters() if not p.requires_grad]
    assert all(p.dtype == torch.bfloat16 for p in frozen)
    trajectory = policy.sample(PROMPTS[:1], generator=torch.Generator().manual_seed(0))
    assert trajectory.log_probs.dtype == torch.float32 and torch.isfinite(trajectory.log_probs).all()


def test_prompt_embeddings_are_computed_once_per_distinct_prompt(policy, monkeypatch):
    calls = []
    original = policy.pipeline.encode_prompt

    def counting(prompts, *args, **kwargs):
        calls.append(list(prompts))
        return original(prompts, *args, **kwargs)

    monkeypatch.setattr(policy.pipeline, "encode_prompt", counting)
    first = policy.encode_prompts(PROMPTS)
    second = policy.encode_prompts(list(reversed(PROMPTS)))
    assert calls == [[PROMPTS[0]], [PROMPTS[1]]]
    torch.testing.assert_close(second, first.flip(0))


def test_saved_lora_loads_with_load_lora_weights(tiny_lcm_path, tmp_path):
    # alpha != rank: the file must say it, or diffusers scales the update by rank / rank = 1 instead of alpha / rank = 2.
    torch.manual_seed(0)  # the adapter's gaussian init: the same weights whichever tests ran before
    policy = LCMPolicy.from_pretrained(tiny_lcm_path, resolution=32, lora_rank=4, lora_alpha=8.0)
    perturb_lora(policy, scale=0.2)  # B != 0: the adapter changes the images
    policy.save_lora(tmp_path)
    expected = policy.sample(PROMPTS[:2], generator=torch.Generator().manual_seed(5)).outputs
    fresh = LatentConsistencyModelPipeline.from_pretrained(tiny_lcm_path)
    fresh.load_lora_weights(tmp_path)
    images = fresh(PROMPTS[:2], num_inference_steps=8, guidance_scale=8.0, generator=torch.Generator().manual_seed(5),
                   output_type="pt", height=32, width=32).images
    # The policy samples with the LoRA merged, the fresh pipeline runs it unmerged: as in the sampler-vs-pipeline test.
    atol = image_rounding_tolerance([fresh.unet, fresh.vae.post_quant_conv, fresh.vae.decoder], [8, 1, 1])
    torch.testing.assert_close(images, expected, atol=atol, rtol=0)
    base = LatentConsistencyModelPipeline.from_pretrained(tiny_lcm_path)(
        PROMPTS[:2], num_inference_steps=8, guidance_scale=8.0, generator=torch.Generator().manual_seed(5),
        output_type="pt", height=32, width=32).images
    assert (base - expected).abs().max() > 1e-3  # the LoRA weights changed the samples


def test_load_lora_restores_weights(tiny_lcm_path, tmp_path):
    source = LCMPolicy.from_pretrained(tiny_lcm_path, resolution=32)
    perturb_lora(source)
    source.save_lora(tmp_path)
    target = LCMPolicy.from_pretrained(tiny_lcm_path, resolution=32)
    target.load_lora(tmp_path)
    for a, b in zip(source.trainable_parameters(), target.trainable_parameters()):
        torch.testing.assert_close(a, b)


def test_bad_model_path_is_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither an existing folder"):
        LCMPolicy.from_pretrained(str(tmp_path / "missing" / "model"))
    with pytest.raises(FileNotFoundError, match="cannot load model"):
        LCMPolicy.from_pretrained(str(tmp_path))  # exists, but is no pipeline


def test_a_pipeline_folder_of_another_family_is_one_line_before_a_model_loads(tiny_flux_path, tiny_sd_path, tmp_path,
                                                                              monkeypatch):
    import rebel_diffusion.policies.lcm as lcm
    from rebel_diffusion.trainer import ConfigError, validate_config
    from test_trainer import tiny_config

    monkeypatch.setattr(lcm, "load_pipeline", lambda *args, **kwargs: pytest.fail("a model started loading"))
    # FLUX (another architecture) and SD 1.5 (a UNet without the LCM's w-embedding, which loaded in full before).
    for path, name in [(tiny_flux_path, "FluxPipeline"), (tiny_sd_path, "StableDiffusionPipeline")]:
        with pytest.raises(ConfigError) as error:
            validate_config(tiny_config(path, tmp_path, policy="lcm"))
        assert f"model.pretrained {str(path)!r} holds a {name}, not a LatentConsistencyModelPipeline: policy 'lcm'" in (
            str(error.value)) and "\n" not in str(error.value)
        with pytest.raises(ValueError, match=f"holds a {name}, not a LatentConsistencyModelPipeline"):
            LCMPolicy.from_pretrained(path)


@pytest.mark.slow  # a fresh interpreter; the message itself is checked in-process above
def test_a_flux_folder_with_policy_lcm_exits_2_with_one_line(tiny_flux_path, tmp_path):
    from test_train import run_all

    result = run_all({"flux": ["--config.policy=lcm", f"--config.model.pretrained={tiny_flux_path}"]}, tmp_path)["flux"]
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "holds a FluxPipeline, not a LatentConsistencyModelPipeline: policy 'lcm'" in lines[0], result.stderr


def test_options_are_validated(tiny_lcm_path):
    with pytest.raises(ValueError, match="logprob_reduction"):
        LCMPolicy.from_pretrained(tiny_lcm_path, resolution=32, logprob_reduction="max")
    with pytest.raises(ValueError, match="resolution"):
        LCMPolicy.from_pretrained(tiny_lcm_path, resolution=30)


def test_step_constants_follow_the_lcm_schedule(policy):
    scheduler = policy.pipeline.scheduler
    assert policy.timesteps.tolist() == [999, 879, 759, 639, 499, 379, 259, 139]
    first = policy.step_constants[0]
    assert first["alpha_prod_t"].item() == pytest.approx(scheduler.alphas_cumprod[999].item())
    assert first["alpha_prod_t_prev"].item() == pytest.approx(scheduler.alphas_cumprod[879].item())
    c_skip, c_out = 0.25 / (9990**2 + 0.25), 9990 / math.sqrt(9990**2 + 0.25)  # timestep_scaling = 10
    assert first["c_skip"].item() == pytest.approx(c_skip) and first["c_out"].item() == pytest.approx(c_out)


def test_lora_on_the_full_size_dreamshaper_unet_shapes():
    # LCM Dreamshaper v7's UNet (Stable Diffusion 1.5 with a 256-d w-embedding), built on the meta device: no memory.
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    with torch.device("meta"):
        unet = UNet2DConditionModel(
            sample_size=96, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, attention_head_dim=8, time_cond_proj_dim=256,
        )
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian", target_modules=list(LORA_TARGETS)))
    adapted = [m for n, m in unet.named_modules() if hasattr(m, "lora_A") and n.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v", "0")]
    assert len(adapted) == 16 * 2 * 4  # 16 transformer blocks, self- and cross-attention, q/k/v/out
    expected = sum(8 * (m.in_features + m.out_features) for m in adapted)
    trainable = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    assert trainable == expected == 1_594_368  # 6.4 MB of fp32 LoRA weights against an 861M-parameter UNet


def test_gaussian_kl_is_the_closed_form_of_two_gaussians_with_one_std():
    torch.manual_seed(0)
    mean, mean_ref, std = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3), torch.tensor(0.7)
    exact = torch.distributions.kl_divergence(torch.distributions.Normal(mean, std),
                                              torch.distributions.Normal(mean_ref, std)).flatten(1)
    torch.testing.assert_close(gaussian_kl(mean, mean_ref, std, "sum"), exact.sum(1))
    torch.testing.assert_close(gaussian_kl(mean, mean_ref, std, "mean"), exact.mean(1))


def test_kl_to_the_base_model_equals_a_separate_base_copy(tiny_lcm_path):
    policy = LCMPolicy.from_pretrained(tiny_lcm_path, resolution=32)
    perturb_lora(policy)
    trajectory = policy.sample(PROMPTS, generator=torch.Generator().manual_seed(2), with_kl=True)
    base = LatentConsistencyModelPipeline.from_pretrained(tiny_lcm_path)
    base.scheduler.set_timesteps(policy.num_steps)
    expected, sampled = [], []
    with torch.no_grad():
        for step in range(policy.num_actions):
            state, t = trajectory.states[:, step], policy.timesteps[step]
            w = policy.w_embedding.expand(len(state), -1)
            out = policy.pipeline.unet(state, t, timestep_cond=w, encoder_hidden_states=trajectory.conditioning).sample
            out_ref = base.unet(state, t, timestep_cond=w, encoder_hidden_states=trajectory.conditioning).sample
            _, mean, std = lcm_step(out, state, **policy.step_constants[step])
            _, mean_ref, _ = lcm_step(out_ref, state, **policy.step_constants[step])
            expected.append(((mean - mean_ref) ** 2 / (2 * std**2)).flatten(1).mean(1))
            # Recorded at sampling, for the reward: ln pi(a) - ln pi_ref(a) at the sampled action (k1).
            action = trajectory.actions[:, step]
            sampled.append((torch.distributions.Normal(mean, std).log_prob(action)
                            - torch.distributions.Normal(mean_ref, std).log_prob(action)).flatten(1).mean(1))
    expected, sampled = torch.stack(expected, dim=1), torch.stack(sampled, dim=1)
    assert expected.min() > 0
    # Each k1 term is a difference of two O(1) log-densities per latent dim: fp32 rounding of a few ulps of those.
    torch.testing.assert_close(trajectory.kl, sampled, rtol=0, atol=1e-5)
    assert not torch.allclose(trajectory.kl, expected, rtol=1e-2, atol=0)
    torch.testing.assert_close(policy.kl(trajectory), expected, rtol=1e-4, atol=1e-7)
    log_prob, kl = policy.log_prob(trajectory, range(2, 3), with_kl=True)
    assert kl.requires_grad
    torch.testing.assert_close(kl.detach(), expected[:, 2:3], rtol=1e-4, atol=1e-7)
    # The adapter is back on afterwards: the policy still reproduces its own log-probs.
    torch.testing.assert_close(log_prob.detach(), trajectory.log_probs[:, 2:3], atol=1e-5, rtol=0)


def lora_base_weights(policy: LCMPolicy) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in policy.pipeline.unet.named_parameters() if "base_layer" in n}


def test_sampling_with_merged_lora_equals_the_unmerged_adapter(policy):
    perturb_lora(policy, scale=0.2)
    before = lora_base_weights(policy)
    assert policy.merge_for_sampling
    merged = policy.sample(PROMPTS, generator=torch.Generator().manual_seed(2), with_kl=True)
    policy.merge_for_sampling = False
    unmerged = policy.sample(PROMPTS, generator=torch.Generator().manual_seed(2), with_kl=True)
    atol = image_rounding_tolerance([policy.pipeline.unet, policy.vae.post_quant_conv, policy.vae.decoder], [8, 1, 1])
    torch.testing.assert_close(merged.outputs, unmerged.outputs, atol=atol, rtol=0)
    torch.testing.assert_close(merged.actions, unmerged.actions, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged.log_probs, unmerged.log_probs, atol=1e-5, rtol=0)
    torch.testing.assert_close(merged.kl, unmerged.kl, atol=1e-6, rtol=1e-4)
    # The base weights are the very same bits again, and the adapter is on and trainable.
    after = lora_base_weights(policy)
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)
    assert all(p.requires_grad for p in policy.trainable_parameters()) and policy.trainable_parameters()


def test_merged_sampling_follows_the_lora_after_an_optimizer_step(policy):
    # The merged weights are kept between calls: the step must reach the next sample as it reaches the unmerged one.
    perturb_lora(policy, scale=0.2)
    before = policy.sample(PROMPTS, generator=torch.Generator().manual_seed(2))
    optimizer = torch.optim.SGD(policy.trainable_parameters(), lr=1.0)
    log_prob, _ = policy.log_prob(before, range(0, 1))
    log_prob.sum().backward()
    optimizer.step()
    merged = policy.sample(PROMPTS, generator=torch.Generator().manual_seed(2))
    policy.merge_for_sampling = False
    unmerged = policy.sample(PROMPTS, generator=torch.Generator().manual_seed(2))
    assert not torch.allclose(unmerged.actions, before.actions, atol=1e-4)
    torch.testing.assert_close(merged.actions, unmerged.actions, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged.log_probs, unmerged.log_probs, atol=1e-5, rtol=0)


def test_merged_lora_is_undone_on_error_and_refuses_grad(policy):
    from rebel_diffusion.policies.lcm import merged_lora

    perturb_lora(policy, scale=0.2)
    before = lora_base_weights(policy)
    with pytest.raises(RuntimeError, match="no-grad"):
        with merged_lora(policy.lora_sites):
            pass
    with pytest.raises(KeyError), torch.no_grad():
        with merged_lora(policy.lora_sites):
            parent, attribute, layer = policy.lora_sites[0]
            assert getattr(parent, attribute) is layer.get_base_layer()  # the plain layer, with W + delta
            assert not torch.equal(layer.get_base_layer().weight, before[next(iter(before))])
            raise KeyError("inside")
    after = lora_base_weights(policy)
    assert after.keys() == before.keys() and all(torch.equal(before[n], after[n]) for n in before)
    trajectory = policy.sample(PROMPTS[:2], generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(policy.log_prob(trajectory, range(0, 1))[0].detach(), trajectory.log_probs[:, :1],
                               atol=1e-5, rtol=0)


def test_half_precision_samples_with_the_unmerged_adapter(tiny_lcm_path):
    policy = LCMPolicy.from_pretrained(tiny_lcm_path, resolution=32, dtype=torch.bfloat16)
    assert not policy.merge_for_sampling


def test_sliced_decode_equals_one_decode(tiny_lcm_path):
    policy = LCMPolicy.from_pretrained(tiny_lcm_path, resolution=32, decode_batch_size=2)
    latents = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    calls = []
    handle = policy.vae.decoder.register_forward_pre_hook(lambda module, args: calls.append(len(args[0])))
    sliced = policy.decode(latents)
    handle.remove()
    assert calls == [2, 2, 1]
    with torch.no_grad():
        whole = policy.vae.decode(latents / policy.vae.config.scaling_factor, return_dict=False)[0]
    whole = policy.pipeline.image_processor.postprocess(whole, output_type="pt")
    assert sliced.shape == (5, 3, 32, 32)
    # Batches of 2 and 1 against one of 5: the conv kernels block their sums by batch size, so the two round in other
    # orders. Tiny VAE: 22 convs (post_quant_conv and the decoder's 21), fan-in <= 64 x 3 x 3 = 576, so
    # sqrt(576 * 22) u = 6.7e-6. Measured: 4.5e-7 here, 1.19e-6 on another machine, and the fp32 decode's own error
    # against a float64 decode 4.3e-7. A slicing bug (order, scale, a dropped slice) moves pixels by O(0.1).
    atol = image_rounding_tolerance([policy.vae.post_quant_conv, policy.vae.decoder], [1, 1])
    torch.testing.assert_close(sliced, whole, atol=atol, rtol=0)


def test_gradient_checkpointing_gives_the_same_log_prob_gradients(tiny_lcm_path):
    gradients = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the same gaussian LoRA init for both
        policy = LCMPolicy.from_pretrained(tiny_lcm_path, resolution=32, gradient_checkpointing=checkpointing)
        assert policy.pipeline.unet.is_gradient_checkpointing == checkpointing
        perturb_lora(policy)
        trajectory = policy.sample(PROMPTS, generator=torch.Generator().manual_seed(4))
        log_prob, kl = policy.log_prob(trajectory, range(2, 4), with_kl=True)
        (log_prob.sum() + kl.sum()).backward()
        gradients.append([p.grad.clone() for p in policy.trainable_parameters()])
    assert any(g.abs().sum() > 0 for g in gradients[0])
    for without, with_checkpointing in zip(*gradients):
        # Bit-exact here (measured 0): checkpointing re-runs the same kernels on the same shapes. The tolerance is not
        # loosened, only left for a torch that accumulates the recomputed blocks' gradients in another order.
        torch.testing.assert_close(with_checkpointing, without, atol=1e-7, rtol=1e-5)


def test_from_config_reads_the_memory_options(tiny_lcm_path):
    from configs.base import get_config

    config = get_config()
    config.model.pretrained, config.resolution = str(tiny_lcm_path), 32
    policy = LCMPolicy.from_config(config)
    assert policy.decode_batch_size == 4 and not policy.pipeline.unet.is_gradient_checkpointing
    config.sample.decode_batch_size, config.train.gradient_checkpointing = 2, True
    policy = LCMPolicy.from_config(config)
    assert policy.decode_batch_size == 2 and policy.pipeline.unet.is_gradient_checkpointing
    with pytest.raises(ValueError, match="decode_batch_size"):
        LCMPolicy.from_pretrained(tiny_lcm_path, resolution=32, decode_batch_size=0)


def test_peak_memory_is_reported_only_where_torch_counts_it():
    from rebel_diffusion.policies.lcm import peak_memory_mb

    assert peak_memory_mb("cpu") is None
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        block = torch.empty(2**20, device="cuda")  # 4 MiB
        assert peak_memory_mb("cuda") >= 4
        del block
