"""`python -m fedhpro.bench`: the benchmarks (see `fedhpro.bench`)."""

import signal
import sys

from fedhpro.bench.cli import main

# Started in the background (a CI runner, `cmd &`, a device tool's shell), a process inherits SIGINT ignored, and
# Python then installs no KeyboardInterrupt handler; `timeout --signal=INT` in scripts/gpu-check.sh must still
# stop the benchmark cleanly (section paper writes what it measured), so the handler is put back here.
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.exit(main())
