"""The DDIM policy on tiny random SD 1.5 and SDXL pipelines: its sampler at eta is the diffusers pipeline at that eta,
its step is Song et al.'s posterior, its log-probs and KLs are what they claim, its gradients are the full graph's, its
LoRA loads in plain diffusers, and bad input is one line before a model loads."""

import copy
import functools
import json
import math

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

from rebel_diffusion.policies.ddim import DDIMPolicy, ddim_step
from policy_checks import (assert_bf16_keeps_lora_float32_and_log_probs_recomputable,
                           assert_kls_equal_torch_distributions, assert_recomputed_log_probs_equal_stored)
from test_lcm import image_rounding_tolerance, perturb_lora

PROMPTS = ["a red circle on a white background", "a blue square", "a red circle on a white background"]
STEPS, GUIDANCE, ETA = 4, 5.0, 1.0
FAMILIES = {"sd": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}


def family_path(request: pytest.FixtureRequest, family: str):
    """The tiny pipeline folder of `family` (built on first use: a test of one family does not build the other)."""
    return request.getfixturevalue(f"tiny_{family}_path")


def load_pipeline(path, family: str):
    """The plain diffusers pipeline with a DDIM scheduler of its own config, as a user (and DDPO) sets it up."""
    pipeline = FAMILIES[family].from_pretrained(path)
    pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@functools.lru_cache(maxsize=2)
def _loaded(path: str, family: str):
    return load_pipeline(path, family)


def make_policy(path, family: str, **options) -> DDIMPolicy:
    """A policy on a fresh copy of the pipeline `path` holds (loaded from disk once per family: loading is most of a
    test's time; the tests that name `from_pretrained` and the trainer's load it the user's way)."""
    options = {"num_steps": STEPS, "guidance_scale": GUIDANCE, "resolution": 32, "eta": ETA, **options}
    return DDIMPolicy(copy.deepcopy(_loaded(str(path), family)), **options)


def pipeline_images(pipeline, prompts, seed, eta=ETA, guidance_scale=GUIDANCE):
    return pipeline(prompts, num_inference_steps=STEPS, guidance_scale=guidance_scale, eta=eta, output_type="pt",
                    height=32, width=32, generator=torch.Generator().manual_seed(seed)).images


def tolerance(pipeline) -> float:
    # Each UNet call is one batch (uncond + cond); the policy caches each prompt's embedding on its own while the
    # pipeline encodes the batch, and a LoRA merged into W rounds differently from peft's side branch.
    encoders = [e for e in (pipeline.text_encoder, getattr(pipeline, "text_encoder_2", None)) if e is not None]
    return image_rounding_tolerance([*encoders, pipeline.unet, pipeline.vae.decoder], [1] * len(encoders) + [STEPS, 1])


def alphas_cumprod() -> torch.Tensor:
    """SD's scaled-linear schedule, computed here from its definition: betas linear in sqrt from 0.00085 to 0.012."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0)


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_sampler_from_pretrained_equals_the_diffusers_pipeline_at_eta(request, family):
    path = family_path(request, family)
    policy = DDIMPolicy.from_pretrained(path, num_steps=STEPS, guidance_scale=GUIDANCE, resolution=32, eta=ETA)
    assert isinstance(policy.pipeline, FAMILIES[family]) and isinstance(policy.pipeline.scheduler, DDIMScheduler)
    trajectory = policy.sample(PROMPTS, generator=torch.Generator().manual_seed(0))
    pipeline = _loaded(str(path), family)  # loaded on its own, with the DDIM scheduler set here
    reference = pipeline_images(pipeline, PROMPTS, 0)
    assert trajectory.outputs.shape == reference.shape == (3, 3, 32, 32)
    assert reference.std() > 0.01  # not a flat image
    torch.testing.assert_close(trajectory.outputs, reference, atol=tolerance(policy.pipeline), rtol=0)
    # Every step carries noise at eta > 0, the last one too: four actions, each with its log-prob.
    assert policy.num_actions == STEPS and trajectory.log_probs.shape == (3, STEPS)
    assert trajectory.states.shape == (3, STEPS, 4, 8, 8)
    # Another eta gives other images: the comparison sees the noise.
    other = pipeline_images(pipeline, PROMPTS, 0, ETA / 2)
    assert (other - reference).abs().max() > 1e-3


def test_sampler_equals_the_pipeline_with_trained_lora_weights_at_another_eta_without_guidance(tiny_sdxl_path):
    policy = make_policy(tiny_sdxl_path, "sdxl", eta=0.3, guidance_scale=1.0)
    perturb_lora(policy)
    trajectory = policy.sample(PROMPTS[:2], generator=torch.Generator().manual_seed(3))
    # The same UNet, the LoRA unmerged; one branch per call, no unconditional half.
    reference = pipeline_images(policy.pipeline, PROMPTS[:2], 3, eta=0.3, guidance_scale=1.0)
    torch.testing.assert_close(trajectory.outputs, reference, atol=tolerance(policy.pipeline), rtol=0)


# ---- The DDIM step against a hand computation (alpha_prod_t = 0.5, alpha_prod_t_prev = 0.8, x = (0.5, -1),
# eps = (0.2, 0.3)) ----

X = torch.tensor([0.5, -1.0], dtype=torch.float64).view(1, 2, 1, 1)
EPS = torch.tensor([0.2, 0.3], dtype=torch.float64).view(1, 2, 1, 1)
ALPHA_T, ALPHA_PREV = torch.tensor(0.5, dtype=torch.float64), torch.tensor(0.8, dtype=torch.float64)


def test_ddim_step_equals_the_hand_computation():
    mean, std = ddim_step(EPS, X, ALPHA_T, ALPHA_PREV, 0.6)
    # sigma_t = 0.6 sqrt(0.2 / 0.5) sqrt(1 - 0.5 / 0.8) = 0.6 sqrt(0.4 * 0.375) = 0.6 sqrt(0.15) = 0.232379
    assert std.item() == pytest.approx(0.6 * math.sqrt(0.15))
    # x0 = (x - sqrt(0.5) eps) / sqrt(0.5) = sqrt(2) x - eps = (0.507107, -1.714214)
    # mean = sqrt(0.8) x0 + sqrt(1 - 0.8 - 0.36 * 0.15) eps = 0.894427 x0 + 0.382099 eps
    #      = (0.453570 + 0.076420, -1.533239 + 0.114630) = (0.529990, -1.418609)
    torch.testing.assert_close(mean.flatten(), torch.tensor([0.529990, -1.418609], dtype=torch.float64), atol=1e-6,
                               rtol=0)


def test_ddim_step_at_eta_zero_is_deterministic_ddim():
    mean, std = ddim_step(EPS, X, ALPHA_T, ALPHA_PREV, 0.0)
    assert std.item() == 0
    # mean = sqrt(0.8) (sqrt(2) x - eps) + sqrt(0.2) eps
    x0 = [math.sqrt(2) * 0.5 - 0.2, -math.sqrt(2) - 0.3]
    expected = [math.sqrt(0.8) * x0[0] + math.sqrt(0.2) * 0.2, math.sqrt(0.8) * x0[1] + math.sqrt(0.2) * 0.3]
    torch.testing.assert_close(mean.flatten(), torch.tensor(expected, dtype=torch.float64))


def test_ddim_step_clamps_x0_but_not_eps_as_the_scheduler_does():
    mean, _ = ddim_step(EPS, X, ALPHA_T, ALPHA_PREV, 0.6, clip_sample_range=1.0)
    # x0 = (0.507107, -1.714214) clamped to (0.507107, -1); eps stays (0.2, 0.3)
    x0 = [math.sqrt(2) * 0.5 - 0.2, -1.0]
    expected = [math.sqrt(0.8) * x0[0] + math.sqrt(0.146) * 0.2, math.sqrt(0.8) * x0[1] + math.sqrt(0.146) * 0.3]
    torch.testing.assert_close(mean.flatten(), torch.tensor(expected, dtype=torch.float64))


def test_a_scheduler_with_clip_sample_is_followed(tiny_sd_path):
    pipeline = copy.deepcopy(_loaded(str(tiny_sd_path), "sd"))
    pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config, clip_sample=True)
    policy = DDIMPolicy(pipeline, num_steps=STEPS, guidance_scale=GUIDANCE, resolution=32, eta=ETA)
    assert policy.clip_sample_range == 1.0
    trajectory = policy.sample(PROMPTS[:2], generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(trajectory.outputs, pipeline_images(policy.pipeline, PROMPTS[:2], 8),
                               atol=tolerance(pipeline), rtol=0)
    # The tiny UNet's x0 leaves [-1, 1] at the noisy steps: without the clamp the images differ.
    unclipped = pipeline_images(_loaded(str(tiny_sd_path), "sd"), PROMPTS[:2], 8)
    assert (unclipped - trajectory.outputs).abs().max() > 1e-3


def test_each_step_pairs_its_timestep_with_the_next_and_the_last_with_the_final_alpha(tiny_sd_path):
    policy = make_policy(tiny_sd_path, "sd")
    # "leading" spacing with steps_offset 1: t = 750, 500, 250, 0 plus 1; the step from t goes to t - 1000 / 4, and
    # from t = 1 to the final alpha, alphas_cumprod[0] (set_alpha_to_one is False).
    assert policy.timesteps.tolist() == [751, 501, 251, 1]
    schedule = alphas_cumprod()
    expected = [(schedule[751], schedule[501]), (schedule[501], schedule[251]), (schedule[251], schedule[1]),
                (schedule[1], schedule[0])]
    for (alpha_prod_t, alpha_prod_t_prev), (want_t, want_prev) in zip(policy.alpha_prod, expected, strict=True):
        assert alpha_prod_t.item() == pytest.approx(want_t.item(), rel=1e-6)
        assert alpha_prod_t_prev.item() == pytest.approx(want_prev.item(), rel=1e-6)


def test_sampler_steps_follow_the_posterior_with_the_generators_noise(tiny_sd_path):
    policy = make_policy(tiny_sd_path, "sd")
    perturb_lora(policy)
    trajectory = policy.sample(PROMPTS[:2], generator=torch.Generator().manual_seed(4))
    generator = torch.Generator().manual_seed(4)
    shape = (2, 4, 8, 8)
    torch.testing.assert_close(trajectory.states[:, 0], torch.randn(shape, generator=generator), atol=0, rtol=0)
    schedule = alphas_cumprod()
    for step, t in enumerate([751, 501, 251, 1]):
        alpha_t, alpha_prev = schedule[t].item(), schedule[max(t - 250, 0)].item()
        with torch.no_grad():
            eps = policy.guided_prediction(trajectory.states[:, step], step, trajectory.conditioning).double()
        x = trajectory.states[:, step].double()
        # Song et al. (2021), written out again here, not calling the module.
        sigma = ETA * math.sqrt((1 - alpha_prev) / (1 - alpha_t)) * math.sqrt(1 - alpha_t / alpha_prev)
        x0 = (x - math.sqrt(1 - alpha_t) * eps) / math.sqrt(alpha_t)
        mean = math.sqrt(alpha_prev) * x0 + math.sqrt(1 - alpha_prev - sigma**2) * eps
        noise = torch.randn(shape, generator=generator).double()
        action = trajectory.actions[:, step].double()
        torch.testing.assert_close(action, mean + sigma * noise, atol=2e-5, rtol=1e-5)
        # The stored log-prob is the Gaussian density of the action, averaged over the 256 latent dims ("mean").
        density = torch.distributions.Normal(mean, sigma).log_prob(action).flatten(1).mean(1)
        torch.testing.assert_close(trajectory.log_probs[:, step].double(), density, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family, reduction, window", [("sd", "mean", ()), ("sdxl", "sum", (1, 2))])
def test_recomputed_log_probs_equal_stored(request, family, reduction, window):
    policy = make_policy(family_path(request, family), family, logprob_reduction=reduction, sde_window=window)
    perturb_lora(policy)
    assert_recomputed_log_probs_equal_stored(policy, PROMPTS, reduction)


def test_the_window_runs_eta_zero_steps_outside_it(tiny_sd_path):
    windowed = make_policy(tiny_sd_path, "sd", sde_window=(1, 2))
    assert windowed.num_actions == 2
    trajectory = windowed.sample(PROMPTS[:2], generator=torch.Generator().manual_seed(6))
    assert trajectory.states.shape == (2, 2, 4, 8, 8)
    # The first step is DDIM's eta = 0 step from the initial noise, drawing nothing from the generator.
    x = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(6))
    alpha_prod_t, alpha_prod_t_prev = windowed.alpha_prod[0]
    with torch.no_grad():
        eps = windowed.guided_prediction(x, 0, trajectory.conditioning)
    first, _ = ddim_step(eps, x, alpha_prod_t, alpha_prod_t_prev, 0.0)
    torch.testing.assert_close(trajectory.states[:, 0], first, atol=1e-6, rtol=0)
    torch.testing.assert_close(trajectory.states[:, 1], trajectory.actions[:, 0])
    # The images come from an eta = 0 step after the window: recomputing it from the last action gives them.
    last = trajectory.actions[:, -1]
    alpha_prod_t, alpha_prod_t_prev = windowed.alpha_prod[3]
    with torch.no_grad():
        final, _ = ddim_step(windowed.guided_prediction(last, 3, trajectory.conditioning), last, alpha_prod_t,
                             alpha_prod_t_prev, 0.0)
    torch.testing.assert_close(windowed.decode(final), trajectory.outputs, atol=1e-5, rtol=0)


def test_k1_and_exact_kl_equal_torch_distributions_against_a_separate_base(tiny_sdxl_path):
    policy = make_policy(tiny_sdxl_path, "sdxl", sde_window=(0, 2))
    perturb_lora(policy, scale=0.1)
    trajectory = policy.sample(PROMPTS, generator=torch.Generator().manual_seed(2), with_kl=True)
    pipeline = _loaded(str(tiny_sdxl_path), "sdxl")  # the base UNet, no adapter
    # SDXL's conditioning, from the plain pipeline: both encoders' contexts, the pooled embedding, zeros for the
    # unconditional half (force_zeros_for_empty_prompt), and the size/crop ids of an uncropped 32 px image.
    embeds, negative, pooled, negative_pooled = pipeline.encode_prompt(PROMPTS, device="cpu")
    time_ids = torch.tensor([[32.0, 32, 0, 0, 32, 32]]).expand(6, -1)
    added = {"text_embeds": torch.cat([negative_pooled, pooled]), "time_ids": time_ids}
    schedule = alphas_cumprod()

    def gaussian(unet, step, state):
        t = [751, 501][step]
        out = unet(torch.cat([state, state]), t, encoder_hidden_states=torch.cat([negative, embeds]),
                   added_cond_kwargs=added).sample
        u, c = out.chunk(2)
        alpha_t, alpha_prev = (torch.tensor(schedule[i].item()) for i in (t, t - 250))
        return ddim_step(u + GUIDANCE * (c - u), state, alpha_t, alpha_prev, ETA)

    assert_kls_equal_torch_distributions(policy, trajectory, pipeline.unet, gaussian)


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_saved_lora_loads_with_load_lora_weights_and_gives_the_policys_eta_zero_images(request, tmp_path, family):
    path = family_path(request, family)
    lora = {"lora_rank": 4, "lora_alpha": 8.0}  # alpha != rank: the file must say it, or diffusers takes alpha = rank
    torch.manual_seed(0)  # the adapter's gaussian init: the same weights whichever tests ran before
    policy = make_policy(path, family, eta=0.0, **lora)
    assert policy.num_actions == 0
    perturb_lora(policy, scale=0.2)  # B != 0: the adapter changes the images
    policy.save_lora(tmp_path)
    expected = policy.sample(PROMPTS[:2], generator=torch.Generator().manual_seed(5)).outputs
    fresh = copy.deepcopy(_loaded(str(path), family))  # as loaded from disk, without an adapter
    fresh.load_lora_weights(tmp_path)
    images = pipeline_images(fresh, PROMPTS[:2], 5, eta=0.0)
    torch.testing.assert_close(images, expected, atol=tolerance(fresh), rtol=0)
    base = pipeline_images(_loaded(str(path), family), PROMPTS[:2], 5, eta=0.0)
    assert (base - expected).abs().max() > 1e-3  # the LoRA weights changed the samples

    target = make_policy(path, family, **lora)
    target.load_lora(tmp_path)
    for a, b in zip(policy.trainable_parameters(), target.trainable_parameters(), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("family, name, window", [("sd", "rebel", ()), ("sd", "rebel", (1, 2)), ("sd", "ppo", (1, 2)),
                                                  ("sd", "grpo", ()), ("sd", "rloo", (2, 2)),
                                                  ("sd", "online_dpo", (0, 1)), ("sdxl", "rebel", (1, 2))])
def test_per_step_gradients_equal_the_full_graph(request, family, name, window):
    from policy_checks import assert_chunked_gradients_equal_full_graph

    torch.manual_seed(0)
    policy = make_policy(family_path(request, family), family, sde_window=window)
    assert_chunked_gradients_equal_full_graph(policy, name, PROMPTS + PROMPTS[1:2], perturb_lora)


def test_an_epoch_makes_the_floor_number_of_unet_calls_and_saves_a_loadable_lora(tiny_sd_path, tmp_path, monkeypatch):
    import rebel_diffusion.trainer as trainer
    from policy_checks import count_denoiser_calls, floor_denoiser_calls
    from test_trainer import read_metrics, tiny_config

    calls = count_denoiser_calls(monkeypatch)
    config = tiny_config(tiny_sd_path, tmp_path, policy="ddim", num_epochs=1, **{
        "grid.num_prompts": 0, "model.num_steps": STEPS, "model.guidance_scale": GUIDANCE, "sample.sde_window": (1, 2)})
    run_dir = trainer.train(config)
    # Sampling runs all 4 steps (the eta = 0 steps too), training only the window's 2 per trajectory.
    assert calls == floor_denoiser_calls(config, STEPS, window=2)

    metrics = read_metrics(run_dir)
    assert [m["epoch"] for m in metrics] == [0] and math.isfinite(metrics[0]["loss"])
    checkpoint = run_dir / "checkpoints" / "epoch_0001"
    card = (checkpoint / "README.md").read_text()
    assert "DDIMScheduler" in card and "eta=1.0" in card
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    pipeline.load_lora_weights(checkpoint)
    assert any("lora" in n for n, _ in pipeline.unet.named_parameters())
    assert json.loads((run_dir / "config.json").read_text())["sample"]["eta"] == 1.0


def test_half_precision_keeps_lora_weights_float32_and_log_probs_finite(tiny_sd_path):
    policy = make_policy(tiny_sd_path, "sd", dtype=torch.bfloat16)
    assert_bf16_keeps_lora_float32_and_log_probs_recomputable(policy, PROMPTS[:2])


@pytest.mark.parametrize("overrides, message", [
    ({"sample.eta": 0.0}, "sample.eta=0 is DDIM's deterministic step: it has no log-probs to train"),
    ({"sample.eta": -0.5}, "sample.eta must be in [0, 1]"),
    ({"sample.eta": 1.5}, "sample.eta must be in [0, 1]"),
    ({"sample.sde_window": (3, 2)}, "sample.sde_window (3, 2) is outside the 4 stochastic steps of sample.eta=1.0"),
    ({"sample.sde_window": (1,)}, "sample.sde_window must be () or (first step, count)"),
])
def test_bad_ddim_options_are_one_line_before_loading(tiny_sd_path, tmp_path, overrides, message):
    from rebel_diffusion.trainer import ConfigError, validate_config
    from test_trainer import tiny_config

    config = tiny_config(tiny_sd_path, tmp_path, policy="ddim", **{"model.num_steps": STEPS, **overrides})
    with pytest.raises(ConfigError) as error:
        validate_config(config)
    assert message in str(error.value) and "\n" not in str(error.value)


def save_sdxl_without_second_encoder(root):
    from conftest import build_tiny_sdxl_pipeline, save_pipeline

    return save_pipeline(root, build_tiny_sdxl_pipeline, second_encoder=False)


def test_another_family_sdxl_without_text_encoder_2_and_ddim_keys_on_lcm_are_one_line(tiny_lcm_path, tmp_path):
    from rebel_diffusion.trainer import ConfigError, validate_config
    from test_trainer import tiny_config

    with pytest.raises(ConfigError, match=r"holds a LatentConsistencyModelPipeline, not a StableDiffusionPipeline or "
                                          r"StableDiffusionXLPipeline: policy 'ddim'"):
        validate_config(tiny_config(tiny_lcm_path, tmp_path, policy="ddim"))
    no_te2 = save_sdxl_without_second_encoder(tmp_path)
    assert json.loads((no_te2 / "model_index.json").read_text())["text_encoder_2"] == [None, None]
    with pytest.raises(ConfigError, match=r"is an SDXL pipeline without text_encoder_2: policy 'ddim' needs both"):
        validate_config(tiny_config(no_te2, tmp_path, policy="ddim"))
    with pytest.raises(ConfigError, match=r"sample.eta does not apply to policy 'lcm' \(only to ddim\)"):
        validate_config(tiny_config(tiny_lcm_path, tmp_path, **{"sample.eta": 0.5}))
    with pytest.raises(ValueError, match="holds a LatentConsistencyModelPipeline"):
        DDIMPolicy.from_pretrained(tiny_lcm_path)
    with pytest.raises(ValueError, match="without text_encoder_2"):
        DDIMPolicy.from_pretrained(no_te2)
    with pytest.raises(FileNotFoundError, match="is neither an existing folder nor a Hugging Face Hub id"):
        DDIMPolicy.from_pretrained(tmp_path / "missing")


@pytest.mark.slow  # two interpreter start-ups, ~25 s on 2 cores; validate_config's messages are tested above
def test_the_command_line_exits_2_with_one_line(tiny_sd_path, tmp_path):
    from test_train import run_all

    no_te2 = save_sdxl_without_second_encoder(tmp_path)
    cases = {
        "eta": ([f"--config.model.pretrained={tiny_sd_path}", "--config.sample.eta=0.0"], "sample.eta=0 is DDIM's"),
        "no text_encoder_2": ([f"--config.model.pretrained={no_te2}"], "without text_encoder_2"),
    }
    results = run_all({name: ["--config.policy=ddim", *args] for name, (args, _) in cases.items()}, tmp_path)
    for name, (_, message) in cases.items():
        lines = results[name].stderr.strip().splitlines()
        assert results[name].returncode == 2 and len(lines) == 1 and message in lines[0], (name, results[name].stderr)
