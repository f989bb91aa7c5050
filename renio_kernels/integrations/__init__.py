"""Drop-in use of the ReNIO loss in existing trainers.

* ``renio_kernels.integrations.hf``: ``renio_distillation_loss`` (prompt + completion ids in, loss
  out, fused-linear when possible) and ``ReNIOTrainerMixin`` for a ``transformers.Trainer``.
* ``renio_kernels.integrations.trl``: ``ReNIODistillationTrainer`` / ``ReNIODistillationConfig``,
  TRL's on-policy ``DistillationTrainer`` with the ReNIO loss (needs ``pip install
  renio-kernels[trl]``).

Submodules are imported explicitly, so this package never imports TRL by itself.
"""
