"""`python -m llava` runs the `llava` command."""

import sys

from .cli import main

sys.exit(main())
