"""``renio-train``: on-policy distillation with the ReNIO loss (``python -m renio_kernels.train``).

Subcommands: ``renio-train [train] ...`` (the default), ``renio-train sft ...``.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "sft":
        from .sft import main as sft_main

        return sft_main(argv[1:])
    if argv and argv[0] == "train":
        argv = argv[1:]
    from .loop import main as train_main

    return train_main(argv)


if __name__ == "__main__":
    main()
