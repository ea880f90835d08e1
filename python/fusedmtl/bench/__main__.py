"""``python -m fusedmtl.bench``: the benchmark command line (see fusedmtl.bench.cli)."""

import sys

from fusedmtl.bench.cli import main

sys.exit(main())
