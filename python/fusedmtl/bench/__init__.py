"""Benchmarks of fusedmtl: the ``fusedmtl-bench`` command line and its sweeps.

Modules: ``common`` (timing, bandwidth, environment, tables, progress), one module per sweep
(``losses``, ``multi_tensor``, ``weighting`` -- the weighting_step sweep --, ``training`` -- the
training_step sweep), ``plots`` (matplotlib figures) and ``cli``. rich and matplotlib are optional:
tables fall back to plain text, and matplotlib is imported only for --plot.
"""
