"""Drop-in use of the ReNIO loss in existing trainers.

* ``renio_kernels.integrations.hf``: ``renio_distillation_loss`` (prompt + completion ids in, loss
  out, fused-linear when possible) and ``ReNIOTrainerMixin`` for a ``transformers.Trainer``.
* ``renio_kernels.integrations.trl``: ``ReNIODistillationTrainer`` / ``ReNIODistillationConfig``,
  TRL's on-policy ``DistillationTrainer`` with the ReNIO loss (needs ``pip install
  renio-kernels[trl]``).
* ``renio_kernels.integrations.run``: the step both share with ``renio-train``
  (``distillation_loss``: teacher, student, then the fused-linear or logits loss) and the
  numerical check of whether a model's logits allow the fused-linear path.
* ``renio_kernels.integrations.steps``: the weight scope inside a ``transformers.Trainer``
  (``weight_scope="global"``: one ``StepNormalizer`` per trainer, finished before clipping).

Submodules are imported explicitly, so this package never imports TRL by itself.
"""
