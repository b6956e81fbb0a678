"""`python -m boxpark` is the `boxpark` command."""

import sys

from .cli import main

sys.exit(main())
