"""``renio-train``: on-policy distillation with the ReNIO loss (``python -m renio_kernels.train``).

Subcommands: ``renio-train [train] ...`` (the default), ``renio-train sft ...``,
``renio-train experiment ...`` (a grid of runs with a paired report; docs/experiments.md).
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """The console-script entry point: 0 after a successful run (an error raises, which exits
    non-zero). ``renio_kernels.train.loop.main`` returns the run's summary instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "sft":
        from .sft import main as sft_main

        sft_main(argv[1:])
        return 0
    if argv and argv[0] == "experiment":
        from .experiment import main as experiment_main

        experiment_main(argv[1:])
        return 0
    if argv and argv[0] == "train":
        argv = argv[1:]
    from .loop import main as train_main

    train_main(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
