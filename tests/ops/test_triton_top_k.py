"""The Triton backend's streaming top-k selects exactly what ``select_top_k``'s rule selects
(the keyed ``torch.topk``): ties to the lower column id, ``-0.0 == +0.0``, a padded teacher
vocabulary, strided rows, ``k`` not a power of two, ``k = V``."""

from __future__ import annotations

import pytest
import torch

from renio_kernels.ops.sparse import _keyed_top_k, select_top_k
from tests.helpers import DEVICE, TRITON_DTYPES

triton_topk = pytest.importorskip("renio_kernels.ops.triton.topk")


def _rule(x: torch.Tensor, vocab: int, k: int) -> torch.Tensor:
    b, t = x.shape[:2]
    return _keyed_top_k(x[..., :vocab].reshape(b * t, vocab).cpu(), k).view(b, t, k)


@pytest.mark.parametrize("dtype", TRITON_DTYPES)
@pytest.mark.parametrize(("vocab", "teacher_vocab", "k"), [(37, 41, 1), (37, 37, 5), (300, 307, 12),
                                                           (130, 130, 130)])  # fmt: skip
def test_streaming_top_k_follows_the_rule(dtype, vocab, teacher_vocab, k):
    g = torch.Generator().manual_seed(vocab + k)
    x = torch.randn(2, 4, teacher_vocab, generator=g)
    x[0, 0, :vocab:3] = 1.0  # ties, some of them across the k-th value
    x[0, 1, 4], x[0, 1, 5] = -0.0, 0.0
    x[1, 2] = torch.round(x[1, 2])  # many ties
    x[1, 3, vocab:] = 50.0  # the padded columns must never be selected
    x = x.to(dtype).to(DEVICE)
    ids = triton_topk.top_k_triton(x, vocab, k)
    assert torch.equal(ids.cpu(), _rule(x.float(), vocab, k))


def test_strided_rows_and_the_backend_hook():
    x = torch.randn(2, 6, 50, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    view = x[:, 1:]  # rows of a view, read in place
    ids = select_top_k(view, 45, 7, kernel=triton_topk.top_k_triton)
    assert torch.equal(ids.cpu(), _rule(view, 45, 7))
