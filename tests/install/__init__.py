"""The packaging tier: a wheel built from this repository, installed into fresh venvs outside it.

It needs no test server (the demo starts its own), so CI runs it once, with the first run."""
