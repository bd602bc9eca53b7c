"""Benchmarks: scripts that print projectord's figures next to a reference measured in the same
run. Run them from the top of a checkout, e.g. `python -m benchmarks.catch_up --smoke`."""
