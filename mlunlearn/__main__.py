"""``python -m mlunlearn …`` runs the command line (see :mod:`mlunlearn.cli`)."""

import sys

from mlunlearn.cli import main

sys.exit(main())
