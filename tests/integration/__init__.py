"""Tests that need a PostgreSQL server (the session starts its own; see conftest.py)."""
