"""``python -m lorainv.cli``: the same as the ``lorainv`` console script."""

import sys

from lorainv.cli import main

sys.exit(main())
