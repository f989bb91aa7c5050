"""Row kernels: each reduces a ``(b, t)`` row of student/teacher logits to a few fp32 numbers
(forward) or writes that row's gradient (backward). ``params`` holds the shared types; one file
per backend stage: ``triton_fwd``/``triton_bwd`` (GPU, or the CPU interpreter), ``torch_chunked``
(portable), ``cpu`` (the native extension in ``csrc/``).
"""
