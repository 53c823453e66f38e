"""Benchmarks of the MoE-LLaVA stack: ``python -m bench [SUITE ...] [--quick]``.

Suites: ``moe_layer`` (the MoE layer against the dense FFN and its peers), ``training`` (stage-2
dense vs stage-3 MoE training step, MFU), ``generation`` (KV-cached tokens/s), ``data`` (DataLoader
headroom over the training step) and ``e2e`` (wall time per stage of the tiny_cpu pipeline);
see ``bench/README.md``.

Each suite is a module registered in :data:`bench.registry.SUITES` exposing ``NAME``,
``config_from_options(quick, **overrides)``, ``run(config, log) -> dict`` (JSON-able) and
``format_table(result) -> str``. :func:`bench.cli.main` runs suites, prints their tables and
writes ``bench_results/<suite>.json``; ``bench.cli.register`` adds the same command to another
``argparse`` CLI (``moe-llava bench``).
"""

from bench.cli import main, run_suite

__all__ = ["main", "run_suite"]
