"""Inputs that used to give a silently wrong number now give the right one or a clear error."""

import pytest
import torch

import renio_kernels as rk
from tests.helpers import CORE_BACKENDS, DEVICE, make_inputs
from tests.test_fused_linear import make_linear


@pytest.mark.parametrize("backend", CORE_BACKENDS)
def test_double_backward_is_a_clear_error(backend):
    s, t, labels = make_inputs(device=DEVICE)
    x = s.clone().requires_grad_()
    loss = rk.renio_loss(x, t, labels, backend=backend, beta=0.5)
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        torch.autograd.grad(loss, x, create_graph=True)
    # A plain backward of the same graph still works afterwards.
    (grad,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(grad).all()


def test_double_backward_fused_linear_is_a_clear_error():
    h_s, w_s, b_s, h_t, w_t, b_t, labels = make_linear()
    for use_renio in (True, False):
        h = h_s.clone().requires_grad_()
        loss = rk.fused_linear_renio_loss(h, w_s, h_t, w_t, labels, use_renio=use_renio)
        with pytest.raises(RuntimeError, match="double backward is not supported"):
            torch.autograd.grad(loss, h, create_graph=True)


@pytest.mark.parametrize("name", ["temperature", "weight_temperature"])
def test_temperatures_whose_reciprocal_overflows_are_rejected(name):
    s, t, labels = make_inputs()
    with pytest.raises(ValueError, match=f"{name} must be >= 2.94e-39"):
        rk.renio_loss(s, t, labels, **{name: 1e-45})
    rk.renio_loss(s, t, labels, **{name: 1e-3})  # small but representable: fine


@pytest.mark.parametrize(
    ("state", "match"),
    [
        (torch.zeros((), dtype=torch.int64), "0-dim floating-point tensor.*torch.int64"),
        (0.5, "0-dim floating-point tensor.*got float"),
        (torch.zeros(1), "got a 1-dim torch.float32 tensor"),
    ],
)
def test_ema_state_must_be_a_float_scalar_tensor(state, match):
    s, t, labels = make_inputs()
    with pytest.raises(ValueError, match=match):
        rk.renio_loss(s, t, labels, weight_norm="ema", ema_state=state)
