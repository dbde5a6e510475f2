"""``python -m fninfluence``: the same command line as the ``fninfluence`` script."""

import sys

from .cli import main

sys.exit(main())
