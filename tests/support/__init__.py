"""What the tests share: the harness, the test projections, a TCP proxy."""
