"""The implementations being timed, each behind one name.

Every provider builds a ``Case`` for a ``Problem``: a closure that runs the loss forward and
returns the scalar, and the leaf tensors whose gradients the backward produces. A provider that
cannot run here (no GPU, extension not built, package missing) raises ``Unavailable`` with the
reason, which lands in the CSV instead of a number.

Semantics: ``reference*`` and ``renio*`` compute the full ReNIO loss (per-sequence weights on
the divergence of docs/SPEC.md). Liger computes the plain divergence with no ReNIO weights (label:
"plain JSD/KL, no ReNIO weights"); it does less work, never more. Liger-Kernel 0.8.5 uses our
beta convention (``m = (1-beta) p_s + beta p_t``, beta=0 forward KL(t||s), beta=1 reverse KL;
``test_liger_beta_convention`` checks it), so beta is passed through unchanged.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .problems import Problem

__all__ = [
    "Case",
    "PROVIDERS",
    "Unavailable",
    "build_case",
    "clear_input_cache",
    "make_fl_inputs",
    "make_inputs",
    "unavailable_reason",
]

PLAIN = "plain JSD/KL, no ReNIO weights"
IGNORED_FRACTION = 0.1


class Unavailable(Exception):
    """This provider cannot run here; the message says why."""


@dataclass
class Case:
    run: Callable[[], torch.Tensor]
    leaves: list[torch.Tensor]
    note: str = ""
    inputs: list[torch.Tensor] = field(default_factory=list)


def _labels(p: Problem, device: str, gen: torch.Generator) -> torch.Tensor:
    labels = torch.randint(0, p.vocab, (p.batch, p.seq), generator=gen)
    labels[torch.rand(p.batch, p.seq, generator=gen) < IGNORED_FRACTION] = -100
    return labels.to(device)


# Providers of one point share its inputs (same seed, same tensors): a worker that times several
# providers side by side holds one copy.
_INPUTS: dict[tuple, tuple] = {}


def clear_input_cache() -> None:
    _INPUTS.clear()


def _cached(fn):
    def wrapper(p: Problem, device: str, seed: int = 0):
        key = (fn.__name__, p, device, seed)
        if key not in _INPUTS:
            _INPUTS[key] = fn(p, device, seed)
        return _INPUTS[key]

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


@_cached
def make_inputs(p: Problem, device: str, seed: int = 0):
    """Student logits (leaf, requires grad), teacher logits and labels, in ``p.dtype``."""
    gen = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, p.dtype)
    # Generated in chunks on the target device so the fp32 staging copy stays small.
    student = torch.empty(p.batch, p.seq, p.vocab, dtype=dtype, device=device)
    teacher = torch.empty_like(student)
    for t in (student, teacher):
        t.normal_(0.0, 2.0, generator=_device_gen(device, gen))
    return student.requires_grad_(), teacher, _labels(p, device, gen)


def _device_gen(device: str, gen: torch.Generator) -> torch.Generator:
    if device == "cpu":
        return gen
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    return torch.Generator(device=device).manual_seed(seed)


@_cached
def make_fl_inputs(p: Problem, device: str, seed: int = 0):
    """Hidden states (B, T, H), lm_head weights (V, H) per side, labels; student ones are leaves."""
    gen = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, p.dtype)
    dgen = _device_gen(device, gen)

    def rand(*shape, std):
        return torch.empty(*shape, dtype=dtype, device=device).normal_(0.0, std, generator=dgen)

    scale = 2.0 / p.hidden**0.5  # logits of standard deviation about 2, as in make_inputs
    hs = rand(p.batch, p.seq, p.hidden, std=1.0).requires_grad_()
    ws = rand(p.vocab, p.hidden, std=scale).requires_grad_()
    ht = rand(p.batch, p.seq, p.hidden, std=1.0)
    wt = rand(p.vocab, p.hidden, std=scale)
    return hs, ws, ht, wt, _labels(p, device, gen)


# ---- logits input ------------------------------------------------------------------------------


def _reference(p: Problem, device: str, compiled: bool = False) -> Case:
    from renio_kernels import reference

    s, t, y = make_inputs(p, device)
    fn = reference.renio_loss
    if compiled:
        # torch.compile's defaults, as a user would call it: static for the first shape, one
        # dynamic-shape recompile when a second shape arrives (GPU workers run many shapes).
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        fn = torch.compile(fn)
    note = "torch.compile of the reference" if compiled else "eager PyTorch (paper trainer path)"
    return Case(lambda: fn(s, t, y, beta=p.beta), [s], note, [s, t])


def _renio(backend: str) -> Callable[[Problem, str], Case]:
    def build(p: Problem, device: str) -> Case:
        from renio_kernels import renio_loss
        from renio_kernels.ops.backends import resolve_backend

        try:
            resolve_backend(backend, torch.device(device))
        except ValueError as err:
            raise Unavailable(str(err)) from err
        s, t, y = make_inputs(p, device)
        run = lambda: renio_loss(s, t, y, beta=p.beta, backend=backend)
        return Case(run, [s], f"backend={backend}", [s, t])

    return build


def _need_cuda(device: str, what: str) -> None:
    if not device.startswith("cuda"):
        raise Unavailable(f"{what} is a Triton kernel: needs a CUDA device")


def _liger_jsd(p: Problem, device: str) -> Case:
    _need_cuda(device, "LigerJSD")
    try:
        from liger_kernel.transformers import LigerJSD
    except ImportError as err:
        raise Unavailable(f"liger-kernel not installed: {err}") from err
    s, t, y = make_inputs(p, device)
    jsd = LigerJSD(beta=p.beta)

    def run():
        ls = torch.log_softmax(s.view(-1, p.vocab), dim=-1)
        with torch.no_grad():
            lt = torch.log_softmax(t.view(-1, p.vocab), dim=-1)
        return jsd(ls, lt, y.view(-1))

    return Case(run, [s], f"log_softmax + LigerJSD; {PLAIN}", [s, t])


# ---- fused linear --------------------------------------------------------------------------------


def _reference_fl(p: Problem, device: str) -> Case:
    from renio_kernels import reference

    hs, ws, ht, wt, y = make_fl_inputs(p, device)

    def run():
        with torch.no_grad():
            teacher = ht @ wt.T
        return reference.renio_loss(hs @ ws.T, teacher, y, beta=p.beta)

    return Case(run, [hs, ws], "matmul + eager reference", [hs, ws, ht, wt])


def _renio_fl(p: Problem, device: str) -> Case:
    from renio_kernels import fused_linear_renio_loss

    hs, ws, ht, wt, y = make_fl_inputs(p, device)
    run = lambda: fused_linear_renio_loss(hs, ws, ht, wt, y, beta=p.beta)
    return Case(run, [hs, ws], "fused_linear_renio_loss (backend auto)", [hs, ws, ht, wt])


# k of the top-k / sparse-teacher rows (a teacher server's typical top-k).
TOP_K = 64


def _renio_fl_top_k(p: Problem, device: str) -> Case:
    from renio_kernels import fused_linear_renio_loss

    hs, ws, ht, wt, y = make_fl_inputs(p, device)
    run = lambda: fused_linear_renio_loss(hs, ws, ht, wt, y, beta=p.beta, top_k=TOP_K)
    return Case(run, [hs, ws], f"fused_linear_renio_loss, top_k={TOP_K}", [hs, ws, ht, wt])


def _renio_fl_sparse(p: Problem, device: str) -> Case:
    from renio_kernels import SparseTeacher, fused_linear_renio_loss

    hs, ws, ht, wt, y = make_fl_inputs(p, device)
    with torch.no_grad():  # the teacher server's work, outside the timed call
        lt = torch.log_softmax((ht @ wt.T).float(), dim=-1)
        top = lt.topk(TOP_K, dim=-1)
        sampled = lt.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        del lt
    teacher = SparseTeacher(top.indices, top.values, sampled)
    run = lambda: fused_linear_renio_loss(hs, ws, teacher, None, y, beta=p.beta)
    note = f"fused_linear_renio_loss, SparseTeacher k={TOP_K} (renormalized)"
    return Case(run, [hs, ws], note, [hs, ws])


def _liger_fl_chunked(p: Problem, device: str) -> Case:
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    except ImportError as err:
        raise Unavailable(f"liger-kernel not installed: {err}") from err
    hs, ws, ht, wt, y = make_fl_inputs(p, device)
    # Soft loss only: the hard (cross-entropy) term is not part of the comparison.
    loss = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=p.beta)
    h2, t2, y1 = hs.view(-1, p.hidden), ht.view(-1, p.hidden), y.view(-1)
    note = f"LigerFusedLinearJSDLoss (torch chunks, compiled; grads made in forward); {PLAIN}"
    return Case(lambda: loss(h2, ws, t2, wt, y1), [hs, ws], note, [hs, ws, ht, wt])


def _liger_fl_triton(p: Problem, device: str) -> Case:
    _need_cuda(device, "LigerFusedLinearJSD")
    try:
        from liger_kernel.transformers import LigerFusedLinearJSD
    except ImportError as err:
        raise Unavailable(f"liger-kernel not installed: {err}") from err
    hs, ws, ht, wt, y = make_fl_inputs(p, device)
    loss = LigerFusedLinearJSD(jsd_beta=p.beta)
    h2, t2, y1 = hs.view(-1, p.hidden), ht.view(-1, p.hidden), y.view(-1)
    note = f"LigerFusedLinearJSD (Triton; grads made in forward); {PLAIN}"
    return Case(lambda: loss(h2, ws, t2, wt, y1), [hs, ws], note, [hs, ws, ht, wt])


# name -> (kind, builder). Order is the order of the table's columns.
PROVIDERS: dict[str, tuple[str, Callable[[Problem, str], Case]]] = {
    "reference": ("logits", _reference),
    "reference-compiled": ("logits", lambda p, d: _reference(p, d, compiled=True)),
    "renio-torch": ("logits", _renio("torch")),
    "renio-cpu": ("logits", _renio("cpu")),
    "renio-triton": ("logits", _renio("triton")),
    "liger-jsd": ("logits", _liger_jsd),
    "reference-fl": ("fused-linear", _reference_fl),
    "renio-fused-linear": ("fused-linear", _renio_fl),
    "renio-fl-top-k": ("fused-linear", _renio_fl_top_k),
    "renio-fl-sparse": ("fused-linear", _renio_fl_sparse),
    "liger-fl-chunked": ("fused-linear", _liger_fl_chunked),
    "liger-fl-triton": ("fused-linear", _liger_fl_triton),
}


def unavailable_reason(name: str, device: str) -> str | None:
    """Why ``name`` cannot run on ``device`` (cheap: no inputs built), or None."""
    cuda = device.startswith("cuda")
    if name in ("liger-jsd", "liger-fl-triton", "renio-triton") and not cuda:
        return f"unavailable: {name} is a Triton kernel: needs a CUDA device"
    if name.startswith("liger") and importlib.util.find_spec("liger_kernel") is None:
        return "unavailable: liger-kernel not installed"
    if name == "renio-cpu":
        if cuda:  # checked first: loading the extension may build it (a minute of the budget)
            return "unavailable: the native CPU kernel does not take CUDA tensors"
        from renio_kernels.ops.backends import resolve_backend

        try:
            resolve_backend("cpu", torch.device("cpu"))
        except ValueError as err:
            return f"unavailable: {err}"
    return None


def build_case(name: str, p: Problem, device: str) -> Case:
    kind, builder = PROVIDERS[name]
    if kind != p.kind:
        raise Unavailable(f"{name} serves {kind} problems, not {p.kind}")
    return builder(p, device)
