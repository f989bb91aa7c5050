"""``gathered_lm_head`` on an FSDP2-style DTensor weight, in a one-process gloo group: the fused
path gets a plain full tensor, and the gradient comes back to the sharded parameter. (ZeRO-3
needs DeepSpeed and a GPU; it is not run here.)"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from renio_kernels.integrations.hf import gathered_lm_head


@pytest.fixture
def world_of_one():
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_dtensor_head_is_gathered_and_gets_its_gradient(world_of_one):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (1,))
    full = torch.randn(7, 4)
    weight = torch.nn.Parameter(distribute_tensor(full, mesh, [Shard(0)]))
    bias = torch.nn.Parameter(distribute_tensor(torch.randn(7), mesh, [Shard(0)]))
    x = torch.randn(3, 4)
    with gathered_lm_head(weight, bias, grad=True) as (w, b):
        assert not isinstance(w, DTensor) and torch.equal(w, full)
        (x @ w.T + b).square().sum().backward()
    assert isinstance(weight.grad, DTensor)
    torch.testing.assert_close(weight.grad.full_tensor(), 2 * (x @ full.T + b.detach()).T @ x)
    with gathered_lm_head(weight, None, grad=False) as (w, b):
        assert b is None and not w.requires_grad
