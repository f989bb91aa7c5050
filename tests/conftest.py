"""Test setup. Must run before anything imports triton: on a machine without a GPU the Triton
kernels are exercised through the interpreter (``TRITON_INTERPRET=1``) on CPU tensors."""

import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest

from tests.helpers import DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def device() -> str:
    return DEVICE
