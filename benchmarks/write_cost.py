"""Write-side benchmark: what the wake-up mechanism (and the store's ordering trigger) costs the
writers, with the real daemon running a projection of their events.

pgbench appends, in interleaved rounds of each mode:
- `bare`: neither of the store's triggers (the daemon only polls, every 20 ms): the reference,
  "no trigger" in issue 13, whose 10 % budget includes the ordering check.
- `none`: the wake-up trigger disabled, the ordering trigger (`events_ordered`, which sets
  `transaction_id` and checks each aggregate's version order) kept: against `bare`, what the
  ordering check alone costs the writers.
- `projectord`: the installed triggers, as shipped.
- `unordered`: as `projectord`, without the ordering trigger: what the wake-up alone costs.
- `always` (only with `--modes`): a NOTIFY in every appending transaction.

Two measures:
- saturating writers: 8, 32 and 64 pgbench clients as fast as they go, 1 and 10 events per
  transaction; appends per second against `bare`, and whether the daemon has caught up (every
  event applied) at the end of each round, and how long that took;
- paced writers: 500 and 2000 transactions a second (Poisson, 8 clients, 1 event each); the
  writers' transaction latency (INSERT + commit) p50/p99 from pgbench's per-transaction log,
  against `bare`.

    python -m benchmarks.write_cost                    # durable embedded server
    python -m benchmarks.write_cost --database-url postgresql://postgres@127.0.0.1/postgres
    python -m benchmarks.write_cost --smoke            # CI: short
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg

from benchmarks.bench_db import (
    argument_parser,
    banner,
    fresh_database,
    median,
    percentile,
    scalar,
    server,
    server_description,
)
from benchmarks.processes import TENANT, append_with_pgbench, daemon
from benchmarks.projections import Pings
from projectord.runner.loop import BUSY_READ_PAUSE

POLL = str(BUSY_READ_PAUSE[1])
ALWAYS_NOTIFY = """
CREATE OR REPLACE FUNCTION projectord.notify_events_appended() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('projectord_' || TG_TABLE_SCHEMA, '');
    RETURN NULL;
END;
$$
"""
ALWAYS_TRIGGER = """
CREATE TRIGGER bench_always_notify AFTER INSERT ON projectord.events
FOR EACH STATEMENT EXECUTE FUNCTION projectord.bench_always_notify()
"""
ALWAYS_FUNCTION = ALWAYS_NOTIFY.replace("notify_events_appended", "bench_always_notify")
# `per` events in one INSERT, each version 1 of a new aggregate; `clock` for the latency probe.
APPEND_MANY = (
    "INSERT INTO projectord.events (tenant_id, aggregate_id, version, type, payload)"
    f" SELECT '{TENANT}', gen_random_uuid(), 1, 'Pinged',"
    " jsonb_build_object('clock', extract(epoch FROM clock_timestamp()))"
    " FROM generate_series(1, {per});\n"
)


def set_mode(url: str, mode: str) -> None:
    """The wake-up trigger on or off (or replaced by a NOTIFY per statement), and the ordering
    trigger on or off."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP TRIGGER IF EXISTS bench_always_notify ON projectord.events")
        wake = "DISABLE" if mode in ("none", "always", "bare") else "ENABLE"
        order = "DISABLE" if mode in ("unordered", "bare") else "ENABLE"
        conn.execute(f"ALTER TABLE projectord.events {wake} TRIGGER events_appended")
        conn.execute(f"ALTER TABLE projectord.events {order} TRIGGER events_ordered")
        if mode == "always":
            conn.execute(ALWAYS_FUNCTION)
            conn.execute(ALWAYS_TRIGGER)


def modes_in_turn(url: str, modes: list[str], round_: int) -> Iterator[str]:
    """This round's rotation of the modes (so that each runs first in turn), each set up, with the
    daemon caught up, before its measurement starts."""
    for mode in modes[round_ % len(modes) :] + modes[: round_ % len(modes)]:
        set_mode(url, mode)
        caught_up(url)
        yield mode


def caught_up(url: str, deadline: float = 60.0) -> float:
    """Seconds until the daemon has applied every event appended so far."""
    started = time.monotonic()
    with psycopg.connect(url, autocommit=True) as conn:
        total = scalar(conn, "SELECT count(*) FROM projectord.events")
        while scalar(conn, "SELECT coalesce(sum(n), 0) FROM pings") < total:
            if time.monotonic() - started > deadline:
                raise SystemExit(f"the daemon did not catch up within {deadline:.0f}s")
            time.sleep(0.01)
    return time.monotonic() - started


def paced_latencies(
    url: str, rate: int, clients: int, seconds: float, state_dir: Path
) -> tuple[float, list[float]]:
    """pgbench at `rate` tx/s with a per-transaction log: (tps, latencies in ms)."""
    for old in state_dir.glob("paced.*"):
        old.unlink()
    tps = append_with_pgbench(
        url,
        clients=clients,
        seconds=seconds,
        state_dir=state_dir,
        rate=rate,
        append_script=APPEND_MANY.replace("{per}", "1"),
        extra=["-l", "--log-prefix", str(state_dir / "paced")],
    )
    latencies = []
    for log in state_dir.glob("paced.*"):
        for line in log.read_text().splitlines():
            fields = line.split()
            latencies.append(int(fields[2]) / 1000)
    return tps, latencies


def main(argv: list[str] | None = None) -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--clients", default="8,32,64", help="saturating pgbench clients")
    parser.add_argument("--per-transaction", default="1,10", help="events per transaction")
    parser.add_argument("--rates", default="500,2000", help="paced writers: tx/s (empty: none)")
    parser.add_argument("--paced-clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--modes", default="bare,none,projectord,unordered")
    args = parser.parse_args(argv)
    if args.smoke:
        args.seconds, args.rounds = min(args.seconds, 2), 1
        args.clients, args.per_transaction, args.rates = "8", "1,10", "500"
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if "bare" not in modes:
        modes.insert(0, "bare")
    clients = [int(c) for c in args.clients.split(",") if c]
    pers = [int(p) for p in args.per_transaction.split(",") if p]
    rates = [int(r) for r in args.rates.split(",") if r]
    banner("write-side")
    with (
        server(args.database_url, fsync_off=args.fsync_off) as admin_url,
        fresh_database(admin_url, [Pings()]) as url,
        tempfile.TemporaryDirectory(prefix="projectord-write-") as tmp,
    ):
        state_dir = Path(tmp)
        print(f"server: {server_description(url)}")
        print(
            f"writers: pgbench, {args.seconds:.0f} s per round, modes {', '.join(modes)} in"
            f" interleaved rounds; the daemon runs `pings` throughout (with the wake-up trigger"
            f" disabled it polls every {POLL} s)"
        )
        rates_by: dict[tuple[int, int, str], list[float]] = {}
        catch_up_by: dict[tuple[int, int, str], list[float]] = {}
        paced_by: dict[tuple[int, str], list[float]] = {}
        with daemon(url, "benchmarks.projections:pings", state_dir, poll_interval=POLL):
            for n_clients in clients:
                for per in pers:
                    script = APPEND_MANY.replace("{per}", str(per))
                    for round_ in range(args.rounds):
                        line = []
                        for mode in modes_in_turn(url, modes, round_):
                            tps = append_with_pgbench(
                                url,
                                clients=n_clients,
                                seconds=args.seconds,
                                state_dir=state_dir,
                                append_script=script,
                            )
                            took = caught_up(url)
                            key = (n_clients, per, mode)
                            rates_by.setdefault(key, []).append(tps * per)
                            catch_up_by.setdefault(key, []).append(took)
                            line.append(f"{mode} {tps * per:,.0f} (caught up {took:.2f}s)")
                        print(
                            f"{n_clients:>2} clients x {per:>2} events/tx, round {round_ + 1}: "
                            + " | ".join(line)
                            + " events/s",
                            flush=True,
                        )
            for rate in rates:
                for round_ in range(args.rounds):
                    line = []
                    for mode in modes_in_turn(url, modes, round_):
                        tps, latencies = paced_latencies(
                            url, rate, args.paced_clients, args.seconds, state_dir
                        )
                        caught_up(url)
                        paced_by.setdefault((rate, mode), []).extend(latencies)
                        line.append(
                            f"{mode} p50 {percentile(latencies, 0.5):.2f}"
                            f" p99 {percentile(latencies, 0.99):.2f} ms ({tps:,.0f} tx/s)"
                        )
                    print(f"paced {rate} tx/s, round {round_ + 1}: " + " | ".join(line), flush=True)
            set_mode(url, "projectord")
    report(args, modes, clients, pers, rates, rates_by, catch_up_by, paced_by)


def report(
    args: object,
    modes: list[str],
    clients: list[int],
    pers: list[int],
    rates: list[int],
    rates_by: dict[tuple[int, int, str], list[float]],
    catch_up_by: dict[tuple[int, int, str], list[float]],
    paced_by: dict[tuple[int, str], list[float]],
) -> None:
    rounds = getattr(args, "rounds", 1)
    print(f"\nsummary: saturating writers, median of {rounds} interleaved rounds (events/s)")
    worst = None
    for n_clients in clients:
        for per in pers:
            base = rates_by[(n_clients, per, "bare")]
            parts = []
            for mode in modes:
                values = rates_by[(n_clients, per, mode)]
                ratios = [v / b for v, b in zip(values, base, strict=True)]
                parts.append(
                    f"{mode} {median(values):,.0f} ({median(ratios):.2f}x,"
                    f" {min(ratios):.2f}-{max(ratios):.2f})"
                )
                if mode == "projectord":
                    worst = median(ratios) if worst is None else min(worst, median(ratios))
            took = max(
                (t for mode in modes for t in catch_up_by[(n_clients, per, mode)]), default=0.0
            )
            print(
                f"  {n_clients:>2} clients x {per:>2}/tx: "
                + " | ".join(parts)
                + f"; caught up within {took:.2f}s after the writers stopped"
            )
    if worst is not None:
        verdict = "met" if worst >= 0.9 else "NOT met"
        print(
            f"  projectord vs bare (no trigger), worst configuration: {worst:.2f}x"
            f" (target >= 0.90x): {verdict}"
        )
    if rates:
        print("summary: paced writers, transaction latency (INSERT + commit), all rounds pooled")
        for rate in rates:
            base = paced_by[(rate, "bare")]
            parts = []
            for mode in modes:
                values = paced_by[(rate, mode)]
                p99 = percentile(values, 0.99)
                parts.append(
                    f"{mode} p50 {percentile(values, 0.5):.2f} p99 {p99:.2f} ms"
                    f" ({p99 / percentile(base, 0.99):.2f}x)"
                )
            print(f"  {rate} tx/s: " + " | ".join(parts))
            if "projectord" not in modes:
                continue
            mine = percentile(paced_by[(rate, "projectord")], 0.99) / percentile(base, 0.99)
            verdict = "met" if mine <= 1.1 else "NOT met"
            print(f"  {rate} tx/s: projectord p99 vs bare {mine:.2f}x (target <= 1.10x): {verdict}")


if __name__ == "__main__":
    main()
