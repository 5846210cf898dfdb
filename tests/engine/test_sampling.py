"""What a UNet predicts and what each prediction type implies about the noise; the DDIM step."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from imagic.engine.sampling import ddim_step, epsilon_from, training_target


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_the_noise_implied_by_a_perfect_prediction_is_the_noise(prediction_type):
    scheduler = DDPMScheduler(prediction_type=prediction_type)
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([10, 500, 900])
    noisy = scheduler.add_noise(x0, noise, t)
    target = training_target(scheduler, x0, noise, t)
    alpha_bar = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(epsilon_from(target, noisy, alpha_bar, prediction_type), noise, atol=1e-3)


def test_an_unknown_prediction_type_is_an_error():
    scheduler = DDPMScheduler()
    scheduler.register_to_config(prediction_type="flow")
    with pytest.raises(ValueError, match="unsupported scheduler prediction_type 'flow'"):
        training_target(scheduler, torch.zeros(1), torch.zeros(1), torch.zeros(1, dtype=torch.long))


def test_ddim_with_the_true_noise_lands_on_the_clean_sample():
    scheduler = DDIMScheduler(clip_sample=False, set_alpha_to_one=True)
    scheduler.set_timesteps(1)
    x0, noise = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    t = scheduler.timesteps[0]
    x = scheduler.add_noise(x0, noise, t.unsqueeze(0))
    assert torch.allclose(ddim_step(scheduler, noise, t, x), x0, atol=1e-4)
