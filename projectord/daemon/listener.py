"""The notification listener: one dedicated LISTEN connection that wakes the runners.

It lives outside the pool, in autocommit (a listener inside a transaction holds notifications back
and fills the server's queue). It never gives up: a lost connection is retried with capped backoff,
and every (re)connection wakes every runner for a catch-up read, because notifications sent while
it was away are gone. A notification it sends itself every `probe_interval` proves the path still
works; a listener that cannot hear itself reconnects.

Appends notify only while the listener is *armed*, and then only the first of them
(sql/migrations/0018_one_notifier_per_arming.sql has the protocol): a busy daemon needs no
wake-ups, and every NOTIFY costs the writers a serialised commit. A runner that has caught up
while the listener is disarmed, and whose read found nothing at all, calls `request_arm` and polls
on a short backoff (a runner that keeps finding events only reads again soon: under load nothing
notifies). Arming offers a wake-up to the next append, then waits for every append that decided
not to notify to end; the listener then wakes the runners, and a read begun after that may be
followed by a sleep. The first notification after an arming disarms it (that append took the
only wake-up, and later ones are silent): the listener wakes every runner, and arms again at
once while appends are rare; while they keep coming, it waits for a runner to ask, and at least
ARM_PAUSE (letting go of its stripes meanwhile). A notification
heard while arming means the wake-up was taken during it: the arming does not count. Arming
holds the channel's advisory lock stripes on this connection, so if the connection dies the
server releases them and the writers stop notifying: a lost connection wakes every runner too.

The listener also polls for every runner, one cheap query each `poll_interval` (the safety net for
appends that notify nobody: a trigger disabled, `session_replication_role = replica`). Runners
then poll on their own only rarely while it is connected, so 50 idle projections cost one query
per poll interval, not 50.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable

import anyio
import anyio.lowlevel
import psycopg

from projectord.backoff import jittered_delay
from projectord.daemon.heartbeat import Heartbeat
from projectord.database import DeadConnection, connect, deadline, describe_error, discard
from projectord.logs import get_logger
from projectord.queries import Queries

log = get_logger("projectord.daemon.listener")

PROBE_PAYLOAD = "probe"
# Arming waits this long for a writer that holds its stripe (a transaction that appended and is
# still open) before giving up; the runner then polls soon and asks again.
ARM_LOCK_TIMEOUT = "200ms"
# How long the listener waits before it arms again (seconds). Each arming costs the writers one
# notifying append, whose commit flushes alone, and up to a flush's worth of waiting for the
# appends that arrive while it commits: nothing while appends are rare, a tenth of busy writers'
# throughput at one arming every 10 ms (benchmarks/write_cost.py). So the pause adapts: an
# arming whose wake-up is taken within QUICK_TAKE of it (or while it is made) means busy writers,
# and the pause doubles, from the first figure up to the second; one that waits longer means rare
# appends, and the next arming follows at once. Between two armings a busy runner polls instead
# (loop.py).
ARM_PAUSE = (0.005, 0.04)
QUICK_TAKE = 0.002
# A batch of this many events read while the listener was not armed means the writers outpace the
# wake-ups (events gathered during one read cycle); one or two is a rare append's. For BUSY_FOR
# after such a batch no arming starts: the busy runner reads again within BUSY_READ_PAUSE
# (loop.py) anyway, and a quiet one polls at most this long apart (note_busy).
BUSY_BATCH = 4
BUSY_FOR = ARM_PAUSE[1]
# While the listener polls for them, idle runners poll on their own this many times less often.
RUNNER_POLL_FACTOR = 12
# An arming, in order (sql/queries/listener.sql; each statement its own transaction): offer the
# wake-up, take the ARMED stripes, wait for the SILENT appends. The second holds on.
ARMING = ("offer_wakeup", "arm_wakeups", "wait_for_silent_appends")
# PostgreSQL's identifier limit (NAMEDATALEN - 1), which channel names share.
MAX_IDENTIFIER_BYTES = 63


def channel_name(schema: str) -> str:
    """The channel the events trigger notifies (sql/migrations/0011_channel_fits_identifier_limit).

    A channel is an identifier, at most 63 bytes: a schema too long for `projectord_<schema>`
    gets the md5 of its name instead, so appends never fail on the channel's length.
    """
    channel = f"projectord_{schema}"
    if len(channel.encode()) > MAX_IDENTIFIER_BYTES:
        channel = f"projectord_{hashlib.md5(schema.encode()).hexdigest()}"
    return channel


class NotificationListener:
    def __init__(
        self,
        dsn: str,
        schema: str,
        wake: Callable[[], None],
        *,
        probe_interval: float = 10.0,
        max_backoff: float = 5.0,
        poll_interval: float = 5.0,
    ) -> None:
        self.dsn = dsn
        self.channel = channel_name(schema)
        self.wake = wake
        self.probe_interval = probe_interval
        self.max_backoff = max_backoff
        self.connected = False
        self.last_heard = 0.0  # monotonic time of the last notification or successful probe
        self.reconnects = 0
        self.heartbeat = Heartbeat("listener")  # beats at least every probe_interval / 2
        self.queries = Queries(schema)
        self.poll_interval = poll_interval
        self._polled_at = 0.0
        self._poll_since = 0  # the horizon of the last poll: later commits have xids above it
        self.armed = False  # holds the stripes, and no append has taken the wake-up yet
        self.heard = 0  # notifications heard from appends, ever: an arming compares before/after
        self._holding = False  # the ARMED stripes are held (armed, or between two armings)
        self._next_arm_at = 0.0  # monotonic time before which no arming starts (ARM_PAUSE)
        self._arm_pause = 0.0  # the pause after the last arming: 0 while appends are rare
        self._armed_at = 0.0  # monotonic time the last arming completed
        self._arm_wanted = False
        self._busy_until = 0.0  # monotonic time until which no arming starts (note_busy)
        self._waiting: anyio.CancelScope | None = None  # the wait for notifications, if any
        self._probe_sent = 0.0  # monotonic time of the probe not heard yet; 0: none pending

    def request_arm(self) -> None:
        """Ask for appends to notify from now on. Returns at once: arming waits for every append
        that decided not to notify to end, which takes as long as the writers' transactions,
        and the runners poll meanwhile. Once armed, the listener wakes every runner, and a read
        that begins after that sees every event that did not notify. Ignored while not
        connected, when asked already (waking the listener for nothing each time would cost a
        turn of its loop), and while a runner has noted busy writers (`note_busy`)."""
        if self.armed or self._arm_wanted or not self.connected or self.busy():
            return
        self._arm_wanted = True
        if self._waiting is not None:
            self._waiting.cancel()

    def note_busy(self, cycle: float = 0.0) -> None:
        """A runner's read brought a batch of BUSY_BATCH events or more while the listener was
        not armed: writers outpace the wake-ups, and it reads again soon by itself, within
        `cycle` seconds (its batch and its pause). For two such cycles, and BUSY_FOR at least,
        no arming starts (a request, the listener's own after a wake-up, is ignored): an arming
        would only cost the writers a notifying commit, and a flush's wait for the appends behind
        it, to wake runners that read anyway. Runners with nothing to read poll meanwhile."""
        self._busy_until = max(self._busy_until, time.monotonic() + max(BUSY_FOR, 2 * cycle))

    def busy(self) -> bool:
        """A runner noted busy writers recently enough that no arming starts (`note_busy`)."""
        return time.monotonic() < self._busy_until

    def runner_poll_interval(self, poll_interval: float) -> float:
        """How long an idle runner may wait for a wake-up before it reads on its own."""
        return poll_interval * RUNNER_POLL_FACTOR if self.connected else poll_interval

    async def _poll(self, conn: psycopg.AsyncConnection[object]) -> None:
        """Every `poll_interval`: wake the runners if any event committed since the last poll.
        An event that commits after a snapshot belongs to a transaction whose xid is at or above
        that snapshot's xmin, so one index probe answers for every projection."""
        now = time.monotonic()
        if now - self._polled_at < self.poll_interval:
            return
        self._polled_at = now
        async with deadline(conn, "the listener's poll"):
            cur = await conn.execute(
                self.queries["poll_events"], {"since": str(self._poll_since)}, prepare=False
            )
            row = await cur.fetchone()
        assert row is not None
        self._poll_since = row[0]
        if row[1]:
            self.wake()

    def _heard(self) -> None:
        """A notification from an append: it took the arming's only wake-up, and appends after
        it are silent. Wake every runner. Taken long after the arming (appends are rare), arm
        again at once, so that the next append notifies too; taken at once (writers are busy),
        leave the next arming to the runners, which ask once a read finds nothing (loop.py), and
        to ARM_PAUSE after it."""
        self.heard += 1
        if self.armed:
            self.armed = False
            quick = time.monotonic() - self._armed_at < QUICK_TAKE
            self._pause_after(quick=quick)
            if not quick:
                self.request_arm()
        self.wake()

    def _pause_after(self, *, quick: bool) -> None:
        """Set when the next arming may start: a wake-up taken quickly doubles the pause, one
        that waited clears it (ARM_PAUSE)."""
        if quick:
            self._arm_pause = min(max(self._arm_pause * 2, ARM_PAUSE[0]), ARM_PAUSE[1])
        else:
            self._arm_pause = 0.0
        self._next_arm_at = time.monotonic() + self._arm_pause

    def _lost(self) -> None:
        """The connection is gone, and with it the stripes: wake everyone, end any attempt."""
        self.connected = False
        self.armed = self._arm_wanted = self._holding = False
        self.wake()

    async def _arm_when_wanted(self, conn: psycopg.AsyncConnection[object]) -> None:
        if self.armed:
            self._arm_wanted = False
            return
        async with deadline(conn, "the listener's arming"):
            if not self._arm_wanted or time.monotonic() < self._next_arm_at:
                # Not armed, and no arming due now (none asked for, or too soon after the last):
                # let go of the stripes. Held, they would send every append the trigger's long
                # way (its SILENT stripe and two reads of `wakeups`), and make every append in
                # REPEATABLE READ or SERIALIZABLE notify, for as long as the writers are busy.
                await self._disarm(conn)
                return
            self._arm_wanted = False
            await self._arm(conn)

    async def _disarm(self, conn: psycopg.AsyncConnection[object]) -> None:
        if self._holding:
            await conn.execute(self.queries["disarm_wakeups"])
            self._holding = False

    async def _arm(self, conn: psycopg.AsyncConnection[object]) -> None:
        """Offer the next append the wake-up, hold the ARMED stripes (waiting for the appends
        that saw none held), wait for the appends that found the wake-up taken; then the
        runners' next read may be followed by a sleep."""
        heard = self.heard
        channel = {"channel": self.channel}
        try:
            for step in ARMING:
                if step == "arm_wakeups":
                    if self._holding:
                        continue  # held since the last arming
                    # Before the statement: if it times out, the stripes it took before the one
                    # it waited for stay held (session locks), and _disarm must release them.
                    self._holding = True
                await conn.execute(self.queries[step], channel)
        except psycopg.errors.LockNotAvailable:  # a writer still open: asked again later
            log.debug("listener.arm_timed_out")
            await self._disarm(conn)
            return
        finally:
            self._next_arm_at = time.monotonic() + self._arm_pause
        if self.heard == heard:
            self.armed = True
            self._armed_at = time.monotonic()
        else:
            # An append took the wake-up while arming (writers are busy); appends after it are
            # silent, and only the next arming waits for them: this one does not count. The
            # runners ask for the next one once they find nothing to read; meanwhile the
            # stripes go (see _arm_when_wanted).
            self._pause_after(quick=True)
            await self._disarm(conn)
        self.wake()  # the runners' last read before sleeping begins now

    async def run(self) -> None:
        failures = 0
        while True:
            self.heartbeat.beat()
            try:
                await self._listen(failures)
            except (psycopg.Error, OSError, TimeoutError) as exc:
                if self.connected or failures == 0:
                    log.warning("listener.disconnected", error=describe_error(exc, self.dsn))
                self._lost()
                failures += 1
                with self.heartbeat.waiting():
                    await anyio.sleep(jittered_delay(failures, 0.05, self.max_backoff))
            else:  # pragma: no cover - _listen only returns by raising
                failures = 0

    def _wait_time(self) -> float:
        now = time.monotonic()
        until = min(self._polled_at + self.poll_interval, now + self.probe_interval / 2)
        if self._arm_wanted:
            until = min(until, self._next_arm_at)
        return max(0.0, until - now)

    def _connected(self, failures: int) -> None:
        self.connected = True
        self.last_heard = time.monotonic()
        if failures:
            self.reconnects += 1
            log.info("listener.reconnected", attempts=failures)
        else:
            log.info("listener.connected", channel=self.channel)
        self.wake()  # catch up on anything notified while no one listened

    async def _listen(self, failures: int) -> None:
        conn = await connect(self.dsn, autocommit=True, connect_timeout=5)
        async with conn:
            # Notifications that arrive while the listener runs its own statements (a poll, an
            # arming, a probe) are read by psycopg and handed over here.
            conn.add_notify_handler(self._on_notify)
            async with deadline(conn, "LISTEN"):
                await conn.execute(f"SET lock_timeout = '{ARM_LOCK_TIMEOUT}'")
                # Its only write is `offer_wakeup`, which a crash may lose: a new connection arms
                # again anyway. Its commit then costs no flush.
                await conn.execute("SET synchronous_commit = off")
                await conn.execute(f'LISTEN "{self.channel}"')
            self._connected(failures)
            self._probe_sent = 0.0
            while True:
                self.heartbeat.beat()
                await self._poll(conn)
                await self._arm_when_wanted(conn)
                # A deliberate wait, bounded: the probe below catches a connection gone silent.
                # `request_arm` cuts it short.
                try:
                    with self.heartbeat.waiting(), anyio.CancelScope() as self._waiting:
                        if not self._arm_wanted or time.monotonic() < self._next_arm_at:
                            heard = await self._wait_for_notifications(conn)
                            if heard:
                                # Let the woken runners send their reads before this loop's
                                # own housekeeping: it then overlaps their round trips.
                                await anyio.lowlevel.checkpoint()
                finally:
                    self._waiting = None
                now = time.monotonic()
                if self._probe_sent and now - self._probe_sent > self.probe_interval:
                    await discard(conn)  # its session may live on over there, still LISTENing
                    raise DeadConnection("the listener did not hear its own probe notification")
                if not self._probe_sent and now - self.last_heard >= self.probe_interval / 2:
                    self._probe_sent = now  # before: psycopg may hand the probe over at once
                    async with deadline(conn, "the listener's probe"):
                        await conn.execute(
                            "SELECT pg_notify(%s, %s)", (self.channel, PROBE_PAYLOAD)
                        )

    async def _wait_for_notifications(self, conn: psycopg.AsyncConnection[object]) -> int:
        """Wait until the server sends something or `_wait_time` passes; returns how many
        notifications were read. It waits on the socket itself: psycopg's `notifies()` wakes
        every 0.1 s to check for interrupts, a good part of an idle daemon's CPU. Between
        statements the server only sends notifications, notices, or an error before it closes
        the session, which `consume_input` then raises."""
        pgconn = conn.pgconn
        heard = self._read_notifications(pgconn)
        if heard:  # a safety net: psycopg hands over what it reads along with a statement's
            return heard  # results; anything left there would otherwise wait for the next packet
        with anyio.move_on_after(self._wait_time()):
            await anyio.wait_readable(pgconn.socket)
            pgconn.consume_input()
        return self._read_notifications(pgconn)

    def _read_notifications(self, pgconn: psycopg.pq.abc.PGconn) -> int:
        heard = 0
        while (pgn := pgconn.notifies()) is not None:
            heard += 1
            channel = pgn.relname.decode(errors="replace")
            payload = pgn.extra.decode(errors="replace")
            self._on_notify(psycopg.Notify(channel, payload, pgn.be_pid))
        return heard

    def _on_notify(self, notify: psycopg.Notify) -> None:
        self.last_heard = time.monotonic()
        if notify.payload == PROBE_PAYLOAD:
            self._probe_sent = 0.0
        else:
            self._heard()
