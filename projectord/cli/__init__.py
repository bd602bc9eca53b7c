"""The `projectord` command line."""
