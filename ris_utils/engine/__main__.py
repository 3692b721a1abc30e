"""``python -m ris_utils.engine merge OUT_DIR``: merge the per-rank logs of a sharded run."""

import sys

from .runner import main

sys.exit(main())
