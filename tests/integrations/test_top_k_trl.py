"""``top_k`` through the TRL trainer: the config field ``renio_top_k`` (TRL's own ``top_k`` is
its sampling top-k) reaches the loss, on the logits and the fused-linear paths."""

import math

import pytest

from tests.helpers import rel_err
from tests.integrations.test_trl import make_trainer, offline  # noqa: F401 (a fixture)


@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused-linear"])
def test_trainer_top_k(tmp_path, offline, fused):  # noqa: F811
    trainer, recorded, _ = make_trainer(tmp_path, fused, renio_top_k=5, beta=0.5, threshold=0.1)
    assert trainer.renio_options.top_k == 5 and trainer.args.top_k == 0
    trainer.train()
    assert len(recorded) == 4
    for loss, functional in recorded:  # functional: renio_loss(..., top_k=5) on the logits
        assert math.isfinite(loss.item()) and rel_err(loss, functional) < 1e-5
