"""The `meshray` command line."""
