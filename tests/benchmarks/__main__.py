"""`python -m tests.benchmarks [--only convert,model] [--workdir DIR] [--quick] [--keep]` (also `make bench`)."""

import sys

from tests.benchmarks.run import main

sys.exit(main())
