"""The flow-matching policy on tiny random SD3 (without T5) and FLUX.1-dev-style pipelines: its ODE is the diffusers
pipeline, its SDE and CPS steps are the formulas of issue 20, its log-probs and KLs are what they claim, its LoRA loads
in plain diffusers."""

import copy
import functools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, FluxPipeline

from rebel_diffusion.policies.flow_match import (FlowMatchPolicy, cps_step, flow_sde_step, latent_image_ids, ode_step,
                                                 pack_latents, unpack_latents)
from policy_checks import (assert_bf16_keeps_lora_float32_and_log_probs_recomputable,
                           assert_kls_equal_torch_distributions, assert_recomputed_log_probs_equal_stored)
from test_lcm import image_rounding_tolerance, perturb_lora

PROMPTS = ["a red circle on a white background", "a blue square", "a red circle on a white background"]
STEPS, GUIDANCE = 4, 4.5
FLUX_GUIDANCE = 3.5  # FLUX.1-dev's default embedded guidance
FLUX_TOKENS = 32  # T5 tokens for the tiny FLUX: its character-level tokenizer needs 28 for the longest prompt


def is_flux(path) -> bool:
    """Whether the folder's model_index.json names a FluxPipeline (else it is the tiny SD3)."""
    return json.loads((Path(path) / "model_index.json").read_text())["_class_name"] == "FluxPipeline"


def family_options(path) -> dict:
    """The guidance and T5 length each tiny pipeline is tested at (FLUX: the embedded guidance)."""
    if is_flux(path):
        return {"guidance_scale": FLUX_GUIDANCE, "max_sequence_length": FLUX_TOKENS}
    return {"guidance_scale": GUIDANCE}


@pytest.fixture(params=["tiny_sd3_path", "tiny_flux_path"], ids=["sd3", "flux"])
def flow_path(request):
    """The tiny SD3 and the tiny FLUX pipeline folder, for the checks every flow family must pass."""
    return request.getfixturevalue(request.param)


def make_policy(path, **options) -> FlowMatchPolicy:
    """A policy on a fresh copy of the pipeline `path` holds (loaded from disk once: loading is most of a test's time;
    the tests named `from_pretrained` and the trainer's load it the user's way)."""
    options = {"num_steps": STEPS, "resolution": 32, **family_options(path), **options}
    return FlowMatchPolicy(copy.deepcopy(_loaded(str(path))), **options)


@functools.lru_cache(maxsize=2)
def _loaded(path: str):
    return load_pipeline(path)


def pipeline_images(pipeline, prompts, seed, guidance_scale=GUIDANCE):
    extra = {"max_sequence_length": FLUX_TOKENS} if isinstance(pipeline, FluxPipeline) else {}
    return pipeline(prompts, num_inference_steps=STEPS, guidance_scale=guidance_scale, output_type="pt", height=32,
                    width=32, generator=torch.Generator().manual_seed(seed), **extra).images


def tolerance(pipeline, guidance_scale=GUIDANCE) -> float:
    # Each transformer call is one batch (uncond + cond); the policy caches each prompt's embedding on its own while the
    # pipeline encodes the batch, and a LoRA merged into W rounds differently from peft's side branch.
    return image_rounding_tolerance([pipeline.text_encoder, pipeline.text_encoder_2, pipeline.transformer,
                                     pipeline.vae.decoder], [1, 1, STEPS, 1])


def load_pipeline(path):
    """The pipeline class the folder's model_index.json names (SD3 without its T5)."""
    options = {} if is_flux(path) else {"text_encoder_3": None, "tokenizer_3": None}
    pipeline = DiffusionPipeline.from_pretrained(path, **options)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.mark.parametrize("guidance_scale", [1.0, GUIDANCE])
def test_ode_sampler_from_pretrained_equals_the_diffusers_pipeline(tiny_sd3_path, guidance_scale):
    policy = FlowMatchPolicy.from_pretrained(tiny_sd3_path, num_steps=STEPS, guidance_scale=guidance_scale,
                                             resolution=32, sde="ode")
    trajectory = policy.sample(PROMPTS, generator=torch.Generator().manual_seed(0))
    reference = pipeline_images(policy.pipeline, PROMPTS, 0, guidance_scale)
    assert trajectory.outputs.shape == reference.shape == (3, 3, 32, 32)
    assert reference.std() > 0.01  # not a flat image
    torch.testing.assert_close(trajectory.outputs, reference, atol=tolerance(policy.pipeline), rtol=0)
    assert trajectory.log_probs.shape == (3, 0) and policy.num_actions == 0


def test_ode_sampler_equals_the_pipeline_with_trained_lora_weights(flow_path):
    policy = make_policy(flow_path, sde="ode")
    perturb_lora(policy)
    trajectory = policy.sample(PROMPTS[:2], generator=torch.Generator().manual_seed(3))
    reference = pipeline_images(policy.pipeline, PROMPTS[:2], 3, policy.guidance_scale)
    torch.testing.assert_close(trajectory.outputs, reference, atol=tolerance(policy.pipeline), rtol=0)


def test_flux_ode_sampler_from_pretrained_equals_the_diffusers_pipeline(tiny_flux_path):
    policy = FlowMatchPolicy.from_pretrained(tiny_flux_path, num_steps=STEPS, guidance_scale=FLUX_GUIDANCE,
                                             resolution=32, sde="ode", max_sequence_length=FLUX_TOKENS)
    assert isinstance(policy.pipeline, FluxPipeline) and not policy.do_cfg
    trajectory = policy.sample(PROMPTS, generator=torch.Generator().manual_seed(0))
    reference = pipeline_images(policy.pipeline, PROMPTS, 0, FLUX_GUIDANCE)
    assert trajectory.outputs.shape == reference.shape == (3, 3, 32, 32)
    assert reference.std() > 0.01  # not a flat image
    torch.testing.assert_close(trajectory.outputs, reference, atol=tolerance(policy.pipeline), rtol=0)
    assert trajectory.log_probs.shape == (3, 0) and trajectory.conditioning.shape == (3, FLUX_TOKENS * 32 + 32)
    # The guidance embedding is fed: another scale gives other images (so the equality above depends on it).
    unguided = pipeline_images(policy.pipeline, PROMPTS, 0, 1.0)
    assert (unguided - reference).abs().max() > 1e-3


def test_flux_sigmas_are_linspace_shifted_by_mu_of_the_token_count(tiny_flux_path):
    policy = make_policy(tiny_flux_path, sde="ode")
    # 32 px / VAE factor 4 = 8x8 latents = 16 tokens of 2x2 patches. mu is linear in the token count, 0.5 at 256 and
    # 1.15 at 4096 (the scheduler's config); the exponential time shift maps t to e^mu / (e^mu + 1/t - 1).
    mu = 0.5 + (1.15 - 0.5) * (16 - 256) / (4096 - 256)
    t = np.linspace(1.0, 1 / STEPS, STEPS)
    expected = np.append(math.exp(mu) / (math.exp(mu) + (1 / t - 1)), 0.0)
    torch.testing.assert_close(policy.sigmas.double(), torch.tensor(expected), atol=1e-6, rtol=0)
    torch.testing.assert_close(policy.timesteps, policy.sigmas[:-1] * 1000)


def test_packing_and_position_ids_are_fluxs():
    latents = torch.randn(2, 16, 8, 6, generator=torch.Generator().manual_seed(0))
    tokens = pack_latents(latents)
    assert tokens.shape == (2, 12, 64)
    torch.testing.assert_close(tokens, FluxPipeline._pack_latents(latents, 2, 16, 8, 6), atol=0, rtol=0)
    # Token (row 1, column 2) holds the patch latents[:, :, 2:4, 4:6], channel-major: written out by hand.
    torch.testing.assert_close(tokens[:, 1 * 3 + 2], latents[:, :, 2:4, 4:6].reshape(2, 64), atol=0, rtol=0)
    torch.testing.assert_close(unpack_latents(tokens, 8, 6), latents, atol=0, rtol=0)
    ids = latent_image_ids(8, 6, torch.device("cpu"), torch.float32)
    torch.testing.assert_close(ids, FluxPipeline._prepare_latent_image_ids(2, 4, 3, "cpu", torch.float32))
    assert ids[1 * 3 + 2].tolist() == [0.0, 1.0, 2.0]


def test_sd3_without_cfg_samples_the_conditional_branch_only(tiny_sd3_path):
    policy = make_policy(tiny_sd3_path, sde="ode", cfg=False)
    assert policy.guidance_scale == GUIDANCE and not policy.do_cfg
    trajectory = policy.sample(PROMPTS[:2], generator=torch.Generator().manual_seed(3))
    # The pipeline runs no guidance at a scale of 1: its conditional prediction alone.
    reference = pipeline_images(policy.pipeline, PROMPTS[:2], 3, 1.0)
    torch.testing.assert_close(trajectory.outputs, reference, atol=tolerance(policy.pipeline), rtol=0)


def test_the_scheduler_gives_the_shifted_sigmas(tiny_sd3_path):
    policy = make_policy(tiny_sd3_path, sde="ode")
    shift = policy.pipeline.scheduler.config.shift
    assert shift == 3.0
    sigmas = policy.sigmas.tolist()
    assert len(sigmas) == STEPS + 1 and sigmas[0] == pytest.approx(1.0) and sigmas[-1] == 0.0
    assert all(a > b for a, b in zip(sigmas, sigmas[1:]))
    torch.testing.assert_close(policy.timesteps, policy.sigmas[:-1] * 1000)


# ---- The step functions against hand computations (sigma = 0.8 -> 0.6, a = 0.7, x = (0.5, -1), v = (0.2, 0.3)) ----

X = torch.tensor([0.5, -1.0], dtype=torch.float64).view(1, 2, 1, 1)
V = torch.tensor([0.2, 0.3], dtype=torch.float64).view(1, 2, 1, 1)
SIGMA, SIGMA_NEXT = torch.tensor(0.8, dtype=torch.float64), torch.tensor(0.6, dtype=torch.float64)


def test_ode_step_is_euler():
    next_x = ode_step(V, X, SIGMA, SIGMA_NEXT)
    torch.testing.assert_close(next_x.flatten(), torch.tensor([0.5 - 0.2 * 0.2, -1.0 - 0.2 * 0.3], dtype=torch.float64))


def test_flow_sde_step_equals_the_hand_computation():
    mean, std = flow_sde_step(V, X, SIGMA, SIGMA_NEXT, 0.7)
    # std_t = 0.7 sqrt(0.8 / 0.2) = 1.4; dt = -0.2; std_t^2 / (2 sigma) = 1.96 / 1.6 = 1.225
    # x = 0.5, v = 0.2: 0.5 + (0.2 + 1.225 (0.5 + 0.2 * 0.2)) (-0.2) = 0.5 - 0.2 * 0.8615 = 0.3277
    # x = -1, v = 0.3: -1 + (0.3 + 1.225 (-1 + 0.2 * 0.3)) (-0.2) = -1 - 0.2 * (0.3 - 1.1515) = -0.8297
    torch.testing.assert_close(mean.flatten(), torch.tensor([0.3277, -0.8297], dtype=torch.float64))
    assert std.item() == pytest.approx(1.4 * math.sqrt(0.2))  # std_t sqrt(-dt) = 0.626099...


def test_flow_sde_step_at_sigma_one_uses_the_next_sigma_in_the_denominator():
    sigma, sigma_next = torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.75, dtype=torch.float64)
    mean, std = flow_sde_step(V, X, sigma, sigma_next, 0.7)
    # std_t = 0.7 sqrt(1 / (1 - 0.75)) = 1.4, dt = -0.25; std_t^2 / 2 = 0.98; (1 - sigma) v = 0
    # 0.5 + (0.2 + 0.98 * 0.5) (-0.25) = 0.3275; -1 + (0.3 - 0.98) (-0.25) = -0.83
    torch.testing.assert_close(mean.flatten(), torch.tensor([0.3275, -0.83], dtype=torch.float64))
    assert std.item() == pytest.approx(1.4 * 0.5)


def test_cps_step_equals_the_hand_computation():
    mean, std = cps_step(V, X, SIGMA, SIGMA_NEXT, 0.5)
    # std = 0.6 sin(pi / 4) = 0.424264; sqrt(0.36 - 0.18) = 0.424264
    # x0 = (0.5 - 0.16, -1 - 0.24) = (0.34, -1.24); x1 = (0.5 + 0.04, -1 + 0.06) = (0.54, -0.94)
    # mean = 0.4 x0 + 0.424264 x1 = (0.136 + 0.229103, -0.496 - 0.398808)
    c = 0.6 / math.sqrt(2)
    assert std.item() == pytest.approx(c)
    torch.testing.assert_close(mean.flatten(), torch.tensor([0.136 + 0.54 * c, -0.496 - 0.94 * c], dtype=torch.float64))


@pytest.mark.parametrize("sde, a", [("flow_sde", 0.7), ("cps", 0.5)])
def test_sampler_steps_follow_the_formulas_with_the_generators_noise(flow_path, sde, a):
    # FLUX's 8x8x16 latents are SD3's shape: the noise, the steps and the log-prob's 1024 elements are the same.
    policy = make_policy(flow_path, sde=sde, noise_level=a)
    perturb_lora(policy)
    trajectory = policy.sample(PROMPTS[:2], generator=torch.Generator().manual_seed(4))
    generator = torch.Generator().manual_seed(4)
    shape = (2, 16, 8, 8)
    x = torch.randn(shape, generator=generator)
    torch.testing.assert_close(trajectory.states[:, 0], x, atol=0, rtol=0)
    for step in range(policy.num_actions):
        sigma, sigma_next = policy.sigmas[step].double().item(), policy.sigmas[step + 1].double().item()
        with torch.no_grad():
            v = policy.guided_prediction(trajectory.states[:, step], step, trajectory.conditioning).double()
        x = trajectory.states[:, step].double()
        if sde == "flow_sde":  # written out again here, not calling the module
            std_t = a * math.sqrt(sigma / (1 - (sigma_next if sigma == 1 else sigma)))
            dt = sigma_next - sigma
            mean = x + (v + std_t**2 / (2 * sigma) * (x + (1 - sigma) * v)) * dt
            std = std_t * math.sqrt(-dt)
        else:
            std = sigma_next * math.sin(a * math.pi / 2)
            mean = (1 - sigma_next) * (x - sigma * v) + math.sqrt(sigma_next**2 - std**2) * (x + (1 - sigma) * v)
        noise = torch.randn(shape, generator=generator).double()
        action = trajectory.actions[:, step].double()
        torch.testing.assert_close(action, mean + std * noise, atol=2e-5, rtol=1e-5)
        # The stored log-prob is the Gaussian density of the action, averaged over the 1024 latent dims ("mean").
        density = torch.distributions.Normal(mean, std).log_prob(action).flatten(1).mean(1)
        torch.testing.assert_close(trajectory.log_probs[:, step].double(), density, atol=1e-4, rtol=0)
    assert policy.num_actions == (STEPS if sde == "flow_sde" else STEPS - 1)


@pytest.mark.parametrize("sde, reduction, window", [("flow_sde", "mean", ()), ("cps", "sum", ()),
                                                     ("flow_sde", "sum", (1, 2))])
def test_recomputed_log_probs_equal_stored(flow_path, sde, reduction, window):
    policy = make_policy(flow_path, sde=sde, logprob_reduction=reduction, sde_window=window)
    perturb_lora(policy)
    assert_recomputed_log_probs_equal_stored(policy, PROMPTS, reduction)


def test_the_window_runs_ode_steps_outside_it(tiny_sd3_path):
    windowed = make_policy(tiny_sd3_path, sde="flow_sde", sde_window=(1, 2))
    assert windowed.num_actions == 2
    trajectory = windowed.sample(PROMPTS[:2], generator=torch.Generator().manual_seed(6))
    assert trajectory.states.shape == (2, 2, 16, 8, 8)
    # The first step is the ODE's: the window's first state is the Euler step from the initial noise.
    generator = torch.Generator().manual_seed(6)
    x = torch.randn((2, 16, 8, 8), generator=generator)
    with torch.no_grad():
        v = windowed.guided_prediction(x, 0, trajectory.conditioning)
    torch.testing.assert_close(trajectory.states[:, 0], x + (windowed.sigmas[1] - windowed.sigmas[0]) * v,
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(trajectory.states[:, 1], trajectory.actions[:, 0])
    # The images come from an ODE step after the window: recomputing it from the last action gives them.
    with torch.no_grad():
        last = trajectory.actions[:, -1]
        v = windowed.guided_prediction(last, 3, trajectory.conditioning)
        final = ode_step(v, last, windowed.sigmas[3], windowed.sigmas[4])
    torch.testing.assert_close(windowed.decode(final), trajectory.outputs, atol=1e-5, rtol=0)


def test_k1_and_exact_kl_equal_torch_distributions_against_a_separate_base(tiny_sd3_path):
    policy = make_policy(tiny_sd3_path, sde="flow_sde", sde_window=(0, 3))
    perturb_lora(policy, scale=0.1)
    trajectory = policy.sample(PROMPTS, generator=torch.Generator().manual_seed(2), with_kl=True)
    base = load_pipeline(tiny_sd3_path).transformer
    embeds, pooled = policy._unpack(trajectory.conditioning)
    negative, negative_pooled = policy.pipeline.encode_prompt([""] * 3, None, None, do_classifier_free_guidance=False,
                                                              max_sequence_length=256)[::2]

    def gaussian(transformer, step, state):
        out = transformer(hidden_states=torch.cat([state, state]), timestep=policy.timesteps[step].expand(6),
                          encoder_hidden_states=torch.cat([negative, embeds]),
                          pooled_projections=torch.cat([negative_pooled, pooled])).sample
        u, c = out.chunk(2)
        return flow_sde_step(u + GUIDANCE * (c - u), state, policy.sigmas[step], policy.sigmas[step + 1], 0.7)

    assert_kls_equal_torch_distributions(policy, trajectory, base, gaussian)


def test_flux_k1_and_exact_kl_equal_torch_distributions_against_a_separate_base(tiny_flux_path):
    policy = make_policy(tiny_flux_path, sde="flow_sde", sde_window=(0, 3))
    perturb_lora(policy, scale=0.1)
    trajectory = policy.sample(PROMPTS, generator=torch.Generator().manual_seed(2), with_kl=True)
    base = load_pipeline(tiny_flux_path).transformer
    embeds, pooled = policy._unpack(trajectory.conditioning)

    def gaussian(transformer, step, state):
        # The transformer as FluxPipeline calls it, with diffusers' own packing and position ids; no unconditional pass.
        out = transformer(hidden_states=FluxPipeline._pack_latents(state, 3, 16, 8, 8),
                          timestep=policy.timesteps[step].expand(3) / 1000,
                          guidance=torch.full([3], FLUX_GUIDANCE), pooled_projections=pooled,
                          encoder_hidden_states=embeds, txt_ids=torch.zeros(FLUX_TOKENS, 3),
                          img_ids=FluxPipeline._prepare_latent_image_ids(3, 4, 4, "cpu", torch.float32)).sample
        v = FluxPipeline._unpack_latents(out, 32, 32, 4)
        return flow_sde_step(v, state, policy.sigmas[step], policy.sigmas[step + 1], 0.7)

    assert_kls_equal_torch_distributions(policy, trajectory, base, gaussian)


def test_saved_lora_loads_with_load_lora_weights_and_gives_the_policys_ode_images(flow_path, tmp_path):
    from configs.flux_pickscore_rebel import FLUX_LORA_TARGETS

    # alpha != rank: the file must say it; FLUX with the FLUX config's targets (its feed-forward layers too).
    options = {"lora_rank": 4, "lora_alpha": 8.0, **({"lora_targets": FLUX_LORA_TARGETS} if is_flux(flow_path) else {})}
    torch.manual_seed(0)  # the adapter's gaussian init: the same weights whichever tests ran before
    policy = make_policy(flow_path, sde="ode", **options)
    if is_flux(flow_path):
        adapted = {n.split(".lora_")[0] for n, p in policy.transformer.named_parameters() if p.requires_grad}
        assert {"transformer_blocks.0.ff.net.2", "single_transformer_blocks.0.attn.to_q"} <= adapted
    perturb_lora(policy, scale=0.1)
    policy.save_lora(tmp_path)
    expected = policy.sample(PROMPTS[:2], generator=torch.Generator().manual_seed(5)).outputs
    fresh = load_pipeline(flow_path)  # StableDiffusion3Pipeline or FluxPipeline, as a user loads it
    assert type(fresh) is type(policy.pipeline)
    fresh.load_lora_weights(tmp_path)
    images = pipeline_images(fresh, PROMPTS[:2], 5, policy.guidance_scale)
    torch.testing.assert_close(images, expected, atol=tolerance(fresh), rtol=0)
    base = pipeline_images(_loaded(str(flow_path)), PROMPTS[:2], 5, policy.guidance_scale)  # no LoRA
    assert (base - expected).abs().max() > 1e-3  # the LoRA weights changed the samples

    target = make_policy(flow_path, sde="ode", **options)
    target.load_lora(tmp_path)
    for a, b in zip(policy.trainable_parameters(), target.trainable_parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_lora_sits_on_the_joint_attention_projections(tiny_sd3_path):
    policy = make_policy(tiny_sd3_path)
    names = [n for n, p in policy.transformer.named_parameters() if p.requires_grad]
    sites = {n.split(".lora_")[0].split(".", 2)[-1] for n in names}
    assert sites == {"attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                     "attn.add_v_proj", "attn.to_add_out"}, sites
    policy.log_prob(policy.sample(PROMPTS[:2], generator=torch.Generator().manual_seed(0)), range(1, 2))[0].sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.trainable_parameters())


def test_one_rebel_epoch_trains_and_writes_metrics(tiny_sd3_path, tmp_path):
    from diffusers import StableDiffusion3Pipeline as Pipeline

    from rebel_diffusion.trainer import train
    from test_trainer import read_metrics, tiny_config

    config = tiny_config(tiny_sd3_path, tmp_path, policy="flow_match", num_epochs=1, kl_coef=0.01, **{
        "model.num_steps": STEPS, "model.guidance_scale": GUIDANCE, "sample.sde_window": (1, 2)})
    run_dir = train(config)
    metrics = read_metrics(run_dir)
    assert [m["epoch"] for m in metrics] == [0] and math.isfinite(metrics[0]["loss"])
    assert metrics[0]["reward_queries"] == 8 and metrics[0]["optimizer_steps"] == 2
    checkpoint = run_dir / "checkpoints" / "epoch_0001"
    assert "StableDiffusion3Pipeline" in (checkpoint / "README.md").read_text()
    pipeline = Pipeline.from_pretrained(tiny_sd3_path, text_encoder_3=None, tokenizer_3=None)
    pipeline.load_lora_weights(checkpoint)
    assert any("lora" in n for n, _ in pipeline.transformer.named_parameters())
    assert json.loads((run_dir / "config.json").read_text())["sample"]["sde_window"] == [1, 2]


@pytest.mark.parametrize("overrides, message", [
    ({"sample.noise_level": -0.1}, "sample.noise_level must be positive for sample.sde='flow_sde', got -0.1"),
    ({"sample.sde": "cps", "sample.noise_level": 1.0}, "sample.noise_level must be below 1 for sample.sde='cps'"),
    ({"sample.sde_window": (3, 2)}, "sample.sde_window (3, 2) is outside the 4 stochastic steps"),
    ({"sample.sde": "cps", "sample.sde_window": (0, 4)}, "sample.sde_window (0, 4) is outside the 3 stochastic steps"),
    ({"sample.sde_window": (1,)}, "sample.sde_window must be () or (first step, count)"),
    ({"sample.sde": "sde"}, "sample.sde must be one of ['ode', 'flow_sde', 'cps']"),
    ({"sample.sde": "ode"}, "sample.sde='ode' is deterministic"),
])
def test_bad_flow_options_are_one_line_before_loading(tiny_sd3_path, tmp_path, overrides, message):
    from rebel_diffusion.trainer import ConfigError, validate_config
    from test_trainer import tiny_config

    config = tiny_config(tiny_sd3_path, tmp_path, policy="flow_match", **{"model.num_steps": STEPS, **overrides})
    with pytest.raises(ConfigError) as error:
        validate_config(config)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_pipeline_of_another_family_and_flow_keys_on_lcm_are_one_line(tiny_sd3_path, tiny_lcm_path, tmp_path):
    from rebel_diffusion.trainer import ConfigError, validate_config
    from test_trainer import tiny_config

    with pytest.raises(ConfigError, match=r"holds a LatentConsistencyModelPipeline, not a StableDiffusion3Pipeline or "
                                          r"FluxPipeline"):
        validate_config(tiny_config(tiny_lcm_path, tmp_path, policy="flow_match"))
    with pytest.raises(ConfigError, match=r"sample.sde does not apply to policy 'lcm' \(only to flow_match\)"):
        validate_config(tiny_config(tiny_lcm_path, tmp_path, **{"sample.sde": "cps"}))
    with pytest.raises(ValueError, match="holds a LatentConsistencyModelPipeline"):
        FlowMatchPolicy.from_pretrained(tiny_lcm_path)
    with pytest.raises(ValueError, match="sample.noise_level"):
        make_policy(tiny_sd3_path, noise_level=-1.0)


def test_train_cfg_defines_the_run_and_a_checkpoint_from_before_it_resumes_with_cfg(tmp_path):
    from configs.base import get_config
    from rebel_diffusion.checkpoints import CHECKPOINT_FILE, CONFIG_FILE, check_resumable, flat_config
    from rebel_diffusion.errors import ConfigError

    config = get_config()
    checkpoint = tmp_path / "epoch_0001"
    checkpoint.mkdir()
    (checkpoint / CHECKPOINT_FILE).write_text(json.dumps({"epoch": 1}))
    saved = {key: value for key, value in flat_config(config).items() if key != "train.cfg"}  # an older run's config
    (checkpoint / CONFIG_FILE).write_text(json.dumps(saved))
    assert check_resumable(config, checkpoint) == []  # it ran with guidance, as train.cfg=True does
    config.train.cfg = False  # the log-probs of another policy: not the same run
    with pytest.raises(ConfigError, match=r"train.cfg: True -> False"):
        check_resumable(config, checkpoint)


def test_flux_folders_with_the_wrong_policy_or_without_t5_and_a_bad_train_cfg_are_one_line(tiny_flux_path, tiny_lcm_path,
                                                                                            tmp_path):
    from rebel_diffusion.trainer import ConfigError, validate_config
    from test_trainer import tiny_config

    def error(path, **overrides) -> str:
        with pytest.raises(ConfigError) as raised:
            validate_config(tiny_config(path, tmp_path, **{"model.num_steps": STEPS, **overrides}))
        assert "\n" not in str(raised.value)
        return str(raised.value)

    validate_config(tiny_config(tiny_flux_path, tmp_path, policy="flow_match", **{"model.num_steps": STEPS}))
    assert "holds a FluxPipeline, not a StableDiffusionPipeline or StableDiffusionXLPipeline" in error(
        tiny_flux_path, policy="ddim")
    assert "train.cfg must be True or False" in error(tiny_flux_path, policy="flow_match", **{"train.cfg": None})
    assert "holds a FluxPipeline, not a LatentConsistencyModelPipeline" in error(tiny_flux_path, policy="lcm")
    assert "train.cfg does not apply to policy 'lcm' (only to flow_match)" in error(
        tiny_lcm_path, policy="lcm", **{"train.cfg": False})
    with pytest.raises(ValueError, match="train.cfg must be True or False"):
        FlowMatchPolicy.from_pretrained(tiny_flux_path, cfg="no")
    with pytest.raises(ValueError, match="model.max_sequence_length must be at most 512 for FLUX, got 513"):
        make_policy(tiny_flux_path, max_sequence_length=513)
    # A FLUX folder whose model_index.json has no T5: refused before loading (its text context comes from T5).
    no_t5 = tmp_path / "flux-without-t5"
    no_t5.mkdir()
    index = json.loads((tiny_flux_path / "model_index.json").read_text())
    (no_t5 / "model_index.json").write_text(json.dumps({**index, "text_encoder_2": [None, None]}))
    assert "is a FluxPipeline without text_encoder_2" in error(no_t5, policy="flow_match")


def assert_one_line_exit_2(cases: dict[str, tuple[list[str], str]], tmp_path) -> None:
    """Each case's `train.py` arguments exit 2 with one line on stderr holding its message."""
    from test_train import run_all

    results = run_all({name: args for name, (args, _) in cases.items()}, tmp_path)
    for name, (_, message) in cases.items():
        lines = results[name].stderr.strip().splitlines()
        assert results[name].returncode == 2 and len(lines) == 1 and message in lines[0], (name, results[name].stderr)


def test_the_command_line_parses_the_window_and_exits_2_with_one_line(tiny_sd3_path, tmp_path):
    common = ["--config.policy=flow_match", f"--config.model.pretrained={tiny_sd3_path}", "--config.model.num_steps=4"]
    assert_one_line_exit_2({
        "window": (common + ["--config.sample.sde_window=(2,3)"], "sample.sde_window (2, 3) is outside"),
    }, tmp_path)


@pytest.mark.slow  # a fresh interpreter; the message itself is checked in-process above
def test_a_flux_folder_with_policy_ddim_exits_2_with_one_line(tiny_flux_path, tmp_path):
    assert_one_line_exit_2({
        "flux with ddim": (["--config.policy=ddim", f"--config.model.pretrained={tiny_flux_path}"],
                           "holds a FluxPipeline, not a StableDiffusionPipeline"),
    }, tmp_path)


@pytest.mark.parametrize("family, name, window", [
    ("sd3", "rebel", ()), ("sd3", "rebel", (1, 2)), ("sd3", "ppo", (1, 2)), ("sd3", "grpo", ()), ("sd3", "rloo", (2, 2)),
    ("sd3", "online_dpo", ()), ("flux", "rebel", ()), ("flux", "rebel", (1, 2)), ("flux", "ppo", (1, 2)),
    ("flux", "rloo", ()),
])
def test_per_step_gradients_equal_the_full_graph(request, family, name, window):
    from policy_checks import assert_chunked_gradients_equal_full_graph

    torch.manual_seed(0)
    policy = make_policy(request.getfixturevalue(f"tiny_{family}_path"), sde="flow_sde", sde_window=window)
    assert_chunked_gradients_equal_full_graph(policy, name, PROMPTS + PROMPTS[1:2], perturb_lora)


@pytest.mark.parametrize("family, cfg", [("sd3", True), ("sd3", False), ("flux", True)])
def test_an_epoch_makes_the_floor_number_of_transformer_calls(request, tmp_path, monkeypatch, family, cfg):
    import rebel_diffusion.trainer as trainer
    from policy_checks import count_denoiser_calls, floor_denoiser_calls
    from test_trainer import tiny_config

    path = request.getfixturevalue(f"tiny_{family}_path")
    calls = count_denoiser_calls(monkeypatch)
    options = family_options(path)
    config = tiny_config(path, tmp_path, policy="flow_match", num_epochs=1, **{
        "grid.num_prompts": 0, "model.num_steps": STEPS, "model.guidance_scale": options["guidance_scale"],
        "model.max_sequence_length": options.get("max_sequence_length", 256), "sample.sde_window": (1, 2),
        "train.cfg": cfg})
    run_dir = trainer.train(config)
    # SD3 without train.cfg and FLUX (its guidance is an embedding) make one conditional call per step.
    assert calls == floor_denoiser_calls(config, STEPS, window=2, cfg=cfg and family == "sd3")
    if family == "flux":  # the checkpoint is a FluxPipeline LoRA, and its card says so
        checkpoint = run_dir / "checkpoints" / "epoch_0001"
        assert "FluxPipeline.from_pretrained" in (checkpoint / "README.md").read_text()
        pipeline = load_pipeline(path)
        pipeline.load_lora_weights(checkpoint)
        assert any("lora" in n for n, _ in pipeline.transformer.named_parameters())


def test_half_precision_keeps_lora_weights_float32_and_log_probs_finite(flow_path):
    policy = make_policy(flow_path, sde="cps", noise_level=0.5, dtype=torch.bfloat16)
    assert_bf16_keeps_lora_float32_and_log_probs_recomputable(policy, PROMPTS[:2])


def test_max_sequence_length_sets_the_rows_of_t5_zeros(tiny_sd3_path, tmp_path):
    from test_trainer import tiny_config

    config = tiny_config(tiny_sd3_path, tmp_path, policy="flow_match", **{"model.num_steps": STEPS,
                                                                          "model.max_sequence_length": 8})
    policy = FlowMatchPolicy.from_config(config)
    embeds, pooled = policy._encode_prompt(PROMPTS[0])
    assert embeds.shape == (16 + 8, 64) and pooled.shape == (64,)  # 16 CLIP tokens, then the 8 rows of zeros
    assert not embeds[16:].any()
