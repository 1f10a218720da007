"""`python -m flexprefill demo`: see flexprefill/cli.py."""

import sys

from .cli import main

sys.exit(main())
