"""``python -m her2score``: the command line (her2score.cli), for a user who wants to be sure which install runs."""
import sys

from her2score.cli import main

sys.exit(main())
