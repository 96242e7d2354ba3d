"""A hostile shardrec plugin for the tests (see plugin.py)."""
