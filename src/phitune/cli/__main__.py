"""`python -m phitune.cli` (the deepspeed launcher's --module form)."""

import sys

from phitune.cli import main

sys.exit(main())
