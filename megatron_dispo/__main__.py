"""`python -m megatron_dispo` is the same as the `megatron-dispo` console script."""

import sys

from megatron_dispo.cli import main

sys.exit(main())
