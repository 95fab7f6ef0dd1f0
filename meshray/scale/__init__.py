"""Scale testing: many hollow nodes per process (`host`) and `meshray scale-test`."""
