import sys

from coembed.cli import main

sys.exit(main())
