"""`python -m deepserve.models` runs the models commands."""

import sys

from deepserve.models.cli import main

sys.exit(main())
