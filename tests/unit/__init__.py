"""Tests that run in seconds without PostgreSQL."""
