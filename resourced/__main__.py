import sys

from resourced.cli import main

sys.exit(main())
