"""The divergences the row kernels compute: one registry, from which everything else derives.

Each entry names a per-element term ``e_v`` of student and teacher log-probabilities (``ls``,
``lt``, ``ps = exp(ls)``, ``pt = exp(lt)``) and its derivative in ``ls``, from which every
backend forms the gradient ``g_j = (c_j - ps_j C) / tau`` (``c_v = de_v/dls_v`` where the clip is
inactive, ``C = sum_v c_v``):

    forward_kl  e = pt (lt - ls)                                 de/dls = -pt
    reverse_kl  e = ps (ls - lt)                                 de/dls = ps (ls - lt + 1)
    jsd         m = (1 - beta) ps + beta pt
                e = beta pt (lt - log m) + (1 - beta) ps (ls - log m)
                                                                 de/dls = (1 - beta) ps (ls - log m)
    tvd         e = |ps - pt| / 2                                de/dls = ps sign(ps - pt) / 2

``mode`` is the compile-time id each kernel language switches on (a Triton constexpr, a C++
template argument). A backend declares the names it implements; ``backend="auto"`` falls back to
one that implements the requested divergence. Kernel variants, the ahead-of-time compile check
and the tests iterate over ``DIVERGENCES``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DIVERGENCES", "Divergence", "by_mode", "resolve_divergence"]


@dataclass(frozen=True)
class Divergence:
    name: str
    mode: int
    doc: str
    # The beta values that select it when ``divergence`` is not given: a point, an open interval
    # (lo, hi), or None when only its name selects it.
    beta: float | tuple[float, float] | None
    # The JSD terms are >= 0 in exact arithmetic (log-sum inequality), so a negative value is
    # rounding noise and only the clip's upper bound gates the gradient.
    nonnegative_terms: bool = False

    def selected_by(self, beta: float) -> bool:
        if self.beta is None:
            return False
        if isinstance(self.beta, tuple):
            return self.beta[0] < beta < self.beta[1]
        return beta == self.beta


DIVERGENCES: dict[str, Divergence] = {
    d.name: d
    for d in (
        Divergence("forward_kl", 0, "KL(teacher || student)", 0.0),
        Divergence("reverse_kl", 1, "KL(student || teacher)", 1.0),
        Divergence("jsd", 2, "generalized JSD, mixture (1-beta) ps + beta pt", (0.0, 1.0), True),
        Divergence("tvd", 3, "total variation distance, |ps - pt| / 2", None),
    )
}


def by_mode(mode: int) -> Divergence:
    return next(d for d in DIVERGENCES.values() if d.mode == mode)


def resolve_divergence(divergence: str | None, beta: float) -> Divergence:
    """The divergence a call computes: ``divergence`` by name, or the one ``beta`` selects.

    Raises ValueError for an unknown name, or a name whose beta range excludes ``beta``.
    """
    if divergence is None:
        return next(d for d in DIVERGENCES.values() if d.selected_by(beta))
    if divergence not in DIVERGENCES:
        raise ValueError(
            f"unknown divergence {divergence!r}; expected None (chosen by beta) or one of "
            f"{tuple(DIVERGENCES)}"
        )
    chosen = DIVERGENCES[divergence]
    if chosen.beta is not None and not chosen.selected_by(beta):
        raise ValueError(
            f"divergence={divergence!r} needs beta {chosen.beta}, got beta={beta}; leave "
            "divergence=None to choose it by beta"
        )
    return chosen
