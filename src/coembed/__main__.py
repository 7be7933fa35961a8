"""``python -m coembed``: the same command as ``coembed``."""

import sys

from coembed.cli import main

sys.exit(main())
