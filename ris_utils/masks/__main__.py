"""``python -m ris_utils.masks``: the step-1 CLI."""

import sys

from .step import cli

sys.exit(cli())
