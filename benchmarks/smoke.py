"""Every benchmark in its smoke mode (small sizes), one after the other: what CI runs to keep the
benchmarks working. The figures it prints mean little at these sizes.

    python -m benchmarks.smoke
"""

from __future__ import annotations

import time

from benchmarks import (
    catch_up,
    fetch_scale,
    large_events,
    live_latency,
    many_projections,
    soak,
    version_swap,
    write_cost,
)


def main() -> None:
    for benchmark in (
        catch_up,
        live_latency,
        write_cost,
        many_projections,
        fetch_scale,
        soak,
        large_events,
        version_swap,
    ):
        started = time.perf_counter()
        print(f"== {benchmark.__name__} --smoke", flush=True)
        benchmark.main(["--smoke"])
        print(f"== {benchmark.__name__}: {time.perf_counter() - started:.0f}s\n", flush=True)


if __name__ == "__main__":
    main()
