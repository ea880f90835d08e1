import sys

from fusedmtl.demo import main

sys.exit(main())
