"""`python -m fedhpro.bench`: the benchmarks (see `fedhpro.bench`)."""

import sys

from fedhpro.bench.cli import main

sys.exit(main())
