"""Jinja2 templates of fvbuild (package data)."""
