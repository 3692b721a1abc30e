"""``python -m ris_utils.data.shapes``: generate the shapes world."""

import sys

from .io import cli

sys.exit(cli())
