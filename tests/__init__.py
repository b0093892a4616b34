"""The test suite as a package, so that `tests.helpers` and `tests.mutants` import as themselves."""
