"""Developer scripts (not part of the wheel); a package so that ``python -m hack.demo``
imports the test support as ``tests.support`` from the repository root."""
