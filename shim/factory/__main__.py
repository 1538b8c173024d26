"""``python -m shim.factory init|status|destroy`` (the same as ``kata-colo-ctl factory ...``)."""
import sys

from shim.factory.cli import main

sys.exit(main())
