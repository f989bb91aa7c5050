"""Row kernels and what they share: ``rows`` (the contract: parameters, per-row stats, the typed
teacher input, the backend record), ``divergences`` (the registry), ``backends`` (selection),
one package per backend (``triton`` on GPUs or the CPU interpreter, ``torch`` portable, ``cpu``
the native extension in ``csrc/``), and ``linear`` (the fused-linear loss's chunk sweeps).
"""
