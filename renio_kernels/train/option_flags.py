"""The training script's config key and flags of each loss option (a field of ``ReNIOOptions``).

A field is the key of its own name and the flag ``--name-with-dashes``, unless its metadata has
a ``script_flag``: a flag (``"--top-k-loss"``) or a tuple (that flag, then aliases), which is then
the flag, and the key it spells (``top_k_loss``). That is the way for an option whose name the
script already uses for a setting of its own (the loss's ``top_k`` next to the sampler's
``--top-k``). A clash without one is an error when ``config.py`` is imported, never a silent
override of the script's setting. ``use_renio`` is set from ``--objective``.

The functions take the fields as arguments (``config.py`` passes ``option_fields()``), so a test
can run them over an extended record.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from dataclasses import field

__all__ = [
    "DERIVED_FROM_OBJECTIVE",
    "SCRIPT_DEFAULTS",
    "check_keys",
    "naming_the_flag",
    "option_field",
    "script_flags",
    "script_key",
]

# Option fields whose config key is not the record's: ``use_renio`` follows ``--objective``.
DERIVED_FROM_OBJECTIVE = {
    "use_renio": field(
        default=None, metadata={"help": "default: from --objective (renio: on, opd: off)"}
    ),
}


# Loss options whose default (and help) differ in the script: it owns the whole optimizer step,
# so it can normalize the weights over every rank and micro-batch (the bare loss sees one call).
SCRIPT_DEFAULTS = {
    "weight_scope": (
        "global",
        "global: ReNIO weights and --reduction normalized over the optimizer step (every rank "
        "and --grad-accum micro-batch, as one batch); micro_batch: within each rank's "
        "micro-batch (the paper's)",
    ),
}


def script_flags(f: dataclasses.Field) -> tuple[str, ...]:
    """The script's flags of the loss option ``f``: its ``script_flag`` metadata (a flag, or the
    flag then its aliases), else ``--name-with-dashes``."""
    given = f.metadata.get("script_flag")
    if given is None:
        return (f"--{f.name.replace('_', '-')}",)
    flags = (given,) if isinstance(given, str) else tuple(given)
    bad = [x for x in flags if not (isinstance(x, str) and x.startswith("--") and len(x) > 2)]
    if not flags or bad:
        raise ValueError(
            f"loss option {f.name!r}: metadata 'script_flag' must be a flag like '--top-k-loss' "
            f"or a tuple of them (the flag, then aliases), got {given!r}"
        )
    return flags


def script_key(f: dataclasses.Field) -> str:
    """The config key (and ``TrainConfig`` field) of the loss option ``f``: its first flag
    without the dashes, ``-`` as ``_``."""
    return script_flags(f)[0][2:].replace("-", "_")


def option_field(f: dataclasses.Field) -> tuple:
    """``(key, type, field)`` of the loss option ``f`` for ``make_dataclass``; the field's
    metadata carries the help text, the choices and the flags."""
    if f.name in DERIVED_FROM_OBJECTIVE:
        return f.name, f"{f.type} | None", DERIVED_FROM_OBJECTIVE[f.name]
    paper = f.metadata["paper_flag"]
    default, doc = SCRIPT_DEFAULTS.get(f.name, (f.default, f.metadata["doc"]))
    meta = {"help": doc + (f" (paper: {paper})" if paper else "")}
    if f.metadata["choices"]:
        meta["choices"] = f.metadata["choices"]
    meta["flags"] = script_flags(f)
    return script_key(f), f.type, field(default=default, metadata=meta)


def check_keys(fields: Iterable[dataclasses.Field], script_names: Iterable[str]) -> None:
    """Every loss option gets a key of its own: one that a setting of the script
    (``script_names``) or another option already has would silently replace it."""
    owner = {name: "a setting of the script" for name in script_names}
    for f in fields:
        key = script_key(f)
        if key in owner:
            raise ValueError(
                f"loss option {f.name!r} would be the config key {key!r} and flag "
                f"--{key.replace('_', '-')}, which {owner[key]} already is: give the field "
                f"metadata 'script_flag', e.g. '--{f.name.replace('_', '-')}-loss'"
            )
        owner[key] = f"the loss option {f.name!r}"


def naming_the_flag(err: ValueError, fields: Iterable[dataclasses.Field]) -> ValueError:
    """``err`` from the record, which names an option by its field name, with the flag added
    where the two differ (``top_k must be ... (top_k is --top-k-loss)``)."""
    for f in fields:
        if script_key(f) != f.name and re.search(rf"\b{f.name}\b", str(err)):
            return ValueError(f"{err} ({f.name} is {script_flags(f)[0]})")
    return err
