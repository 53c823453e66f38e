"""Benchmarks of the MoE-LLaVA stack: ``python -m bench [SUITE ...] [--quick]``.

Each suite is a module registered in :data:`bench.registry.SUITES` exposing ``NAME``,
``config_from_options(quick, **overrides)``, ``run(config, log) -> dict`` (JSON-able) and
``format_table(result) -> str``. :func:`bench.cli.main` runs suites, prints their tables and
writes ``bench_results/<suite>.json``; ``bench.cli.register`` adds the same command to another
``argparse`` CLI (``moe-llava bench``).
"""

from bench.cli import main, run_suite

__all__ = ["main", "run_suite"]
