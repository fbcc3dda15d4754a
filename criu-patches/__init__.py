"""CRIU patches applied by fvbuild (package data: see `series`)."""
