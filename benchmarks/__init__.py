"""Benchmarks of the ReNIO loss: time, memory and distance to the machine's floor.

``python -m benchmarks run --preset cpu-quick`` measures, appends rows to
``benchmarks/results/<device>.csv`` and writes plots and a markdown table; see
``docs/performance.md`` for what each column means and how the floor is defined.

Layout: ``problems`` (shapes and presets), ``providers`` (what is timed), ``worker`` (one child
process that times a provider on its points), ``ceilings`` (copy bandwidth, exp and matmul rates
measured in the same run), ``floor`` (the bytes / transcendentals / FLOPs a pass must cost),
``runner`` (spawns workers, writes CSV rows) and ``report`` (plots and the markdown table).
"""
