"""The private torch parts the optimizer step relies on (sdpo.train.torch_hooks) still behave
as the step needs: a torch release that changes them fails here, by name."""

from __future__ import annotations

import torch

from sdpo.train import torch_hooks


def test_the_scalers_device_scale_is_its_scale_without_a_sync():
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    parameter = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([parameter], lr=0.1)
    scaler.scale(parameter.sum()).backward()  # the scale tensor exists from the first scale()
    scale = torch_hooks.scale_on_device(scaler)
    assert isinstance(scale, torch.Tensor) and scale.device == parameter.device
    assert float(scale) == scaler.get_scale() == 1024.0
    scaler.step(optimizer)
    parameter.grad = torch.full_like(parameter, float("inf"))
    scaler.update(new_scale=256.0)
    assert float(torch_hooks.scale_on_device(scaler)) == 256.0


def fused_adamw_after_a_step():
    torch.manual_seed(0)
    parameter = torch.nn.Parameter(torch.randn(4))
    optimizer = torch.optim.AdamW([parameter], lr=0.1, fused=True)
    parameter.grad = torch.randn(4)
    optimizer.step()
    return parameter, optimizer


def test_the_fused_adamw_skip_flag_leaves_weights_moments_and_step_alone():
    parameter, optimizer = fused_adamw_after_a_step()
    before = parameter.detach().clone()
    state = {key: value.clone() for key, value in optimizer.state[parameter].items()}
    parameter.grad = torch.randn(4)
    with torch_hooks.skip_flag(optimizer, torch.ones(())):
        optimizer.step()
    assert not hasattr(optimizer, "found_inf")  # removed again
    assert torch.equal(parameter.detach(), before)
    for key, value in optimizer.state[parameter].items():
        assert torch.equal(value, state[key]), key
    # And a flag of 0.0 updates as an ordinary step does.
    with torch_hooks.skip_flag(optimizer, torch.zeros(())):
        optimizer.step()
    assert not torch.equal(parameter.detach(), before)
    assert float(optimizer.state[parameter]["step"]) == float(state["step"]) + 1
