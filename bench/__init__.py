"""The benchmark of fusedmtl, run from a checkout: ``python -m bench`` or ``make bench`` (not part
of the installed package).

Modules: ``cli`` (the command line), ``sweep`` (the Sweep interface, rows, targets), the harness by
concern (``timing``, ``environment``, ``tables``), ``workload`` (shapes, gradients, methods),
``peers`` (torchjd's adapters), one module per sweep (``losses``, ``multi_tensor``,
``weighting_step``, ``training_step``), ``plots`` (--plot) and ``readme_tables`` (the README's
measured tables from a run's JSON). Speed targets: ``targets.json``.
"""
