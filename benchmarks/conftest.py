"""pytest-benchmark setup for ``pytest benchmarks/ --benchmark-only``.

The project's pytest config disables benchmarks (``--benchmark-disable`` in addopts) so that
``make test`` never times anything; asking for ``--benchmark-only`` here turns them back on.
Triton providers need a CUDA device here (never the interpreter): on a CPU they are skipped.
"""

import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    if config.getoption("benchmark_only", default=False):
        config.option.benchmark_enable = True
