import sys

from phitune.cli import main

sys.exit(main())
