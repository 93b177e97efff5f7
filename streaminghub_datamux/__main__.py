"""``python -m streaminghub_datamux``: the same as the ``datamux`` command."""

import sys

from .cli import main

sys.exit(main())
