"""``python -m genie serve ...``: the same as the ``genie`` console script."""

import sys

from genie.cli import main

sys.exit(main())
