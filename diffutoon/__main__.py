"""`python -m diffutoon ...` is the `diffutoon` command."""

import sys

from .cli import main

sys.exit(main())
