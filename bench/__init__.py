"""Benchmarks of the project's own code paths, run from the repository root: ``python -m bench.<suite>``
(see ``bench/README.md``). Not installed with the package."""
