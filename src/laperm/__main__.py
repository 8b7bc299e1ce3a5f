"""`python -m laperm ...` is the `laperm` command."""

import sys

from .cli import main

sys.exit(main())
