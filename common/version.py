"""The one kata-colo version string (pyproject's ``version`` must match; a unit test checks)."""
VERSION = "0.1.0"
