"""Build this host's kernels into the cache: `python -m deepserve.flowserve.kernels`."""

import sys

from deepserve.flowserve.kernels.library import main

sys.exit(main())
