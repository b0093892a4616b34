"""Root conftest: puts the package on the path for `pytest` run from a checkout (tox installs it too)."""
