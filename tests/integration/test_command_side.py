"""The command side: dispatch, idempotent command ids, optimistic concurrency with retry,
failures that append nothing, read-your-writes against the real daemon, `projectord dispatch`."""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import psycopg
import pytest

from projectord.commands.aggregate import (
    Aggregate,
    Change,
    CommandPayload,
    CommandRegistry,
    handles,
)
from projectord.commands.dispatch import CommandIdReused, Dispatcher, ReadModelTimeout
from projectord.commands.store import Command, CommandStatus, CommandStore
from projectord.database import connect
from projectord.samples import Account, Balances
from tests.support.harness import TENANT, DaemonProcess, TestDatabase, run_cli, wait_until

SAMPLES = "projectord.samples:demo_projections"
SAMPLE_AGGREGATES = "projectord.samples:demo_aggregates"
OTHER_TENANT = uuid.UUID("00000000-0000-0000-0000-00000000000b")


class Explode(CommandPayload):
    aggregate_id: uuid.UUID


class Faulty(Aggregate):
    """A handler with a bug: it raises instead of deciding."""

    aggregate_type = "faulty"

    @handles(Explode)
    def explode(self, command: Explode) -> list[Change]:
        raise RuntimeError("the handler has a bug")


REGISTRY = CommandRegistry([Account, Faulty])


def deposit(account: uuid.UUID, amount: int, **kwargs: Any) -> Command:
    return Command(TENANT, "Deposit", {"account_id": str(account), "amount": amount}, **kwargs)


def withdraw(account: uuid.UUID, amount: int) -> Command:
    return Command(TENANT, "Withdraw", {"account_id": str(account), "amount": amount})


def run_with_connection(
    db: TestDatabase, body: Callable[[psycopg.AsyncConnection[Any]], Awaitable[Any]]
) -> Any:
    async def main() -> Any:
        async with await connect(db.url, autocommit=True) as conn:
            return await body(conn)

    return anyio.run(main)


def dispatch(db: TestDatabase, command: Command, **options: Any) -> Command:
    dispatcher = Dispatcher(REGISTRY, **options)
    return run_with_connection(db, lambda conn: dispatcher.dispatch(conn, command))  # type: ignore[no-any-return]


def dispatch_concurrently(
    db: TestDatabase, batches: list[list[Command]], max_attempts: int = 1000
) -> list[Command]:
    """Each batch on its own connection, all batches at once: real concurrent writers."""
    dispatcher = Dispatcher(REGISTRY, max_attempts=max_attempts)
    outcomes: list[Command] = []

    async def writer(batch: list[Command], start: anyio.Event) -> None:
        async with await connect(db.url, autocommit=True) as conn:
            await start.wait()
            for command in batch:
                outcomes.append(await dispatcher.dispatch(conn, command))

    async def main() -> None:
        start = anyio.Event()
        async with anyio.create_task_group() as tasks:
            for batch in batches:
                tasks.start_soon(writer, batch, start)
            await anyio.sleep(0.2)  # let every writer connect, then release them together
            start.set()

    anyio.run(main)
    return outcomes


def account_events(db: TestDatabase, account: uuid.UUID) -> list[tuple[Any, ...]]:
    return db.rows(
        "SELECT version, type, payload, metadata->>'command_id' FROM projectord.events"
        " WHERE aggregate_id = %s ORDER BY version",
        (account,),
    )


def balance_from_events(db: TestDatabase, account: uuid.UUID) -> int:
    signs = {"Deposited": 1, "Withdrawn": -1}
    return sum(signs[t] * p["amount"] for _, t, p, _ in account_events(db, account))


def stored_status(db: TestDatabase, command_id: uuid.UUID) -> tuple[str, str | None]:
    row = db.rows("SELECT status, error FROM projectord.commands WHERE id = %s", (command_id,))
    return row[0]


def test_commands_table_exists_after_init(db: TestDatabase) -> None:
    assert db.init() == []
    columns = {
        name
        for (name,) in db.rows(
            "SELECT column_name FROM information_schema.columns"
            " WHERE table_schema = 'projectord' AND table_name = 'commands'"
        )
    }
    assert {"id", "tenant_id", "type", "payload", "status", "metadata", "result"} <= columns


def test_dispatch_appends_the_decided_events_and_records_the_result(db: TestDatabase) -> None:
    account = uuid.uuid4()
    command = deposit(account, 40, metadata={"correlation_id": "req-1"})
    outcome = dispatch(db, command)
    assert outcome.status is CommandStatus.CONSUMED
    assert outcome.aggregate_id == account and outcome.attempts == 1
    events = db.rows(
        "SELECT aggregate_type, version, type, payload, metadata, global_position, tenant_id"
        " FROM projectord.events"
    )
    assert len(events) == 1
    aggregate_type, version, type_, payload, metadata, position, tenant = events[0]
    assert (aggregate_type, version, type_, payload, tenant) == (
        "account",
        1,
        "Deposited",
        {"amount": 40},
        TENANT,
    )
    assert metadata == {
        "correlation_id": "req-1",
        "command_id": str(command.id),
        "command_type": "Deposit",
    }
    assert outcome.result is not None
    assert outcome.result["events"][0]["global_position"] == position
    assert outcome.result["version"] == 1
    assert stored_status(db, command.id) == ("consumed", None)


def test_concurrent_deposits_lose_no_update(db: TestDatabase) -> None:
    """8 writers on one account at once: every deposit lands once, versions stay contiguous, and
    the balance is what dispatching the same commands one after another gives."""
    account = uuid.uuid4()
    rng = random.Random(7)
    batches = [[deposit(account, rng.randint(1, 100)) for _ in range(12)] for _ in range(8)]
    outcomes = dispatch_concurrently(db, batches)

    assert all(o.status is CommandStatus.CONSUMED for o in outcomes), [o.error for o in outcomes]
    assert any(o.attempts > 1 for o in outcomes), "the writers never collided: no concurrency"
    events = account_events(db, account)
    assert [version for version, *_ in events] == list(range(1, 97))
    assert sorted(command_id for *_, command_id in events) == sorted(
        str(c.id) for batch in batches for c in batch
    )

    serial_account = uuid.uuid4()
    for batch in batches:
        for command in batch:
            dispatch(db, deposit(serial_account, command.payload["amount"]))
    assert balance_from_events(db, account) == balance_from_events(db, serial_account)
    assert balance_from_events(db, account) == sum(c.payload["amount"] for b in batches for c in b)


def test_concurrent_withdrawals_never_overdraw(db: TestDatabase) -> None:
    """The check-then-act of a withdrawal holds under concurrency: of 20 concurrent withdrawals
    of 10 from a balance of 100, exactly 10 succeed and the balance ends at 0, never below."""
    account = uuid.uuid4()
    assert dispatch(db, deposit(account, 100)).status is CommandStatus.CONSUMED
    outcomes = dispatch_concurrently(db, [[withdraw(account, 10)] for _ in range(20)])

    consumed = [o for o in outcomes if o.status is CommandStatus.CONSUMED]
    refused = [o for o in outcomes if o.status is CommandStatus.FAILED]
    assert len(consumed) == 10 and len(refused) == 10
    assert all("insufficient funds" in (o.error or "") for o in refused)
    assert balance_from_events(db, account) == 0
    assert db.scalar("SELECT count(*) FROM projectord.events WHERE type = 'Withdrawn'") == 10


def test_version_conflict_reloads_then_gives_up_clearly(db: TestDatabase) -> None:
    """A writer that commits version 2 while the dispatcher is deciding on version 1 makes the
    append clash. With one attempt allowed the command fails and appends nothing; with two, the
    dispatcher reloads, sees the other writer's event and appends version 3."""
    account = uuid.uuid4()
    dispatch(db, deposit(account, 5))

    def clash(max_attempts: int) -> Command:
        dispatcher = Dispatcher(REGISTRY, max_attempts=max_attempts)
        command = withdraw(account, 5)

        async def body(conn: psycopg.AsyncConnection[Any]) -> Command:
            version = db.scalar(
                "SELECT max(version) FROM projectord.events WHERE aggregate_id = %s", (account,)
            )
            async with await connect(db.url) as other:
                await other.execute(
                    "INSERT INTO projectord.events (tenant_id, aggregate_id, version, type,"
                    " payload) VALUES (%s, %s, %s, 'Deposited', '{\"amount\": 1}')",
                    (TENANT, account, version + 1),
                )
                outcome: list[Command] = []

                async def dispatch_in_background() -> None:
                    outcome.append(await dispatcher.dispatch(conn, command))

                async with anyio.create_task_group() as tasks:
                    tasks.start_soon(dispatch_in_background)
                    await anyio.to_thread.run_sync(wait_for_lock_wait, db)
                    await other.commit()
            return outcome[0]

        return run_with_connection(db, body)  # type: ignore[no-any-return]

    gave_up = clash(max_attempts=1)
    assert gave_up.status is CommandStatus.FAILED
    assert gave_up.error is not None and "gave up after 1 attempt" in gave_up.error
    assert "another writer appended first" in gave_up.error
    assert [(v, t) for v, t, *_ in account_events(db, account)] == [
        (1, "Deposited"),
        (2, "Deposited"),
    ]

    retried = clash(max_attempts=2)
    assert retried.status is CommandStatus.CONSUMED and retried.attempts == 2
    assert [(v, t) for v, t, *_ in account_events(db, account)][-2:] == [
        (3, "Deposited"),
        (4, "Withdrawn"),
    ]


def wait_for_lock_wait(db: TestDatabase) -> None:
    """Until some backend of this database waits on a lock (the dispatcher's blocked append)."""
    wait_until(
        lambda: (
            db.scalar(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
            > 0
        ),
        timeout=10,
    )


def test_same_command_id_twice_appends_once(db: TestDatabase) -> None:
    account = uuid.uuid4()
    command = deposit(account, 25)
    first = dispatch(db, command)
    again = dispatch(db, deposit(account, 25, id=command.id))
    assert again.status is CommandStatus.CONSUMED
    assert again.result == first.result
    assert len(account_events(db, account)) == 1

    racing = deposit(account, 7)
    outcomes = dispatch_concurrently(db, [[racing] for _ in range(6)])
    assert {o.status for o in outcomes} == {CommandStatus.CONSUMED}
    assert len({json.dumps(o.result, sort_keys=True) for o in outcomes}) == 1
    assert balance_from_events(db, account) == 32
    assert db.scalar("SELECT count(*) FROM projectord.commands") == 2


def test_a_reused_command_id_for_another_request_is_refused(db: TestDatabase) -> None:
    account = uuid.uuid4()
    command = deposit(account, 25)
    dispatch(db, command)
    with pytest.raises(CommandIdReused, match="already used for a different command"):
        dispatch(db, deposit(account, 999, id=command.id))
    assert balance_from_events(db, account) == 25
    assert stored_status(db, command.id) == ("consumed", None)


def test_a_pending_command_left_by_a_dead_dispatcher_is_completed(db: TestDatabase) -> None:
    """A dispatcher that stored the command and died before deciding leaves it pending;
    dispatching the same id again decides it, once."""
    account = uuid.uuid4()
    command = deposit(account, 11)
    run_with_connection(db, lambda conn: CommandStore().store(conn, command))
    assert stored_status(db, command.id) == ("pending", None)
    assert dispatch(db, deposit(account, 11, id=command.id)).status is CommandStatus.CONSUMED
    assert stored_status(db, command.id) == ("consumed", None)
    assert balance_from_events(db, account) == 11


def test_a_failing_handler_fails_the_command_and_appends_nothing(db: TestDatabase) -> None:
    target = uuid.uuid4()
    crashed = dispatch(db, Command(TENANT, "Explode", {"aggregate_id": str(target)}))
    assert crashed.status is CommandStatus.FAILED
    assert crashed.error == "handler Faulty.explode raised RuntimeError: the handler has a bug"

    account = uuid.uuid4()
    dispatch(db, deposit(account, 10))
    refused = dispatch(db, withdraw(account, 11))
    assert refused.status is CommandStatus.FAILED
    assert refused.error is not None and "insufficient funds" in refused.error
    assert stored_status(db, refused.id) == ("failed", refused.error)
    assert db.scalar("SELECT count(*) FROM projectord.events") == 1
    assert dispatch(db, withdraw(account, 10)).status is CommandStatus.CONSUMED


def test_an_aggregate_of_another_tenant_is_refused(db: TestDatabase) -> None:
    account = uuid.uuid4()
    dispatch(db, deposit(account, 10))
    foreign = Command(OTHER_TENANT, "Withdraw", {"account_id": str(account), "amount": 10})
    outcome = dispatch(db, foreign)
    assert outcome.status is CommandStatus.FAILED
    assert outcome.error == f"aggregate {account} belongs to another tenant"
    assert balance_from_events(db, account) == 10


def test_an_unknown_command_type_fails_and_appends_nothing(db: TestDatabase) -> None:
    outcome = dispatch(db, Command(TENANT, "Transfer", {"amount": 5}))
    assert outcome.status is CommandStatus.FAILED
    assert outcome.error == "unknown command type 'Transfer' (known: Deposit, Explode, Withdraw)"
    assert stored_status(db, outcome.id) == ("failed", outcome.error)
    assert db.scalar("SELECT count(*) FROM projectord.events") == 0


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        ({"amount": 5}, "account_id: Field required"),
        ({"account_id": "not-a-uuid", "amount": 5}, "account_id: Input should be a valid UUID"),
        ({"account_id": "{account}", "amount": "5"}, "amount: Input should be a valid integer"),
        ({"account_id": "{account}", "amount": 2.5}, "amount: Input should be a valid integer"),
        ({"account_id": "{account}", "amount": -3}, "amount: Input should be greater than 0"),
        ({"account_id": "{account}", "amount": 5, "memo": "x"}, "memo: Extra inputs"),
    ],
)
def test_an_invalid_payload_fails_and_appends_nothing(
    db: TestDatabase, payload: dict[str, Any], problem: str
) -> None:
    account = uuid.uuid4()
    if payload.get("account_id") == "{account}":
        payload = {**payload, "account_id": str(account)}
    outcome = dispatch(db, Command(TENANT, "Deposit", payload))
    assert outcome.status is CommandStatus.FAILED
    assert outcome.error is not None
    assert outcome.error.startswith("invalid payload for Deposit: ")
    assert problem in outcome.error
    assert db.scalar("SELECT count(*) FROM projectord.events") == 0


def test_read_your_writes_returns_only_once_the_projection_shows_the_new_state(
    db: TestDatabase, state_dir: Path
) -> None:
    db.init(SAMPLES)
    account = uuid.uuid4()
    dispatcher = Dispatcher(REGISTRY)

    def read_balance() -> int | None:
        return db.scalar("SELECT balance FROM public.balances WHERE id = %s", (account,))

    def dispatch_and_read(command: Command, timeout: float) -> tuple[Command, int | None]:
        async def body(conn: psycopg.AsyncConnection[Any]) -> tuple[Command, int | None]:
            outcome = await dispatcher.dispatch_and_wait(
                conn, command, [Balances()], timeout=timeout
            )
            return outcome, read_balance()

        return run_with_connection(db, body)  # type: ignore[no-any-return]

    # No daemon yet: the events are appended, but the projection cannot show them in time.
    first = deposit(account, 100)
    with pytest.raises(ReadModelTimeout, match="balances"):
        dispatch_and_read(first, timeout=0.3)
    assert stored_status(db, first.id) == ("consumed", None)
    assert read_balance() is None

    with DaemonProcess(db.url, SAMPLES, state_dir) as daemon:
        expected = 100
        for amount in (7, 13, 1, 30, 2, 9, 4, 21, 8, 5):
            outcome, seen = dispatch_and_read(deposit(account, amount), timeout=20)
            expected += amount
            assert outcome.status is CommandStatus.PROCESSED
            assert seen == expected
        outcome, seen = dispatch_and_read(withdraw(account, 50), timeout=20)
        assert seen == expected - 50
        assert stored_status(db, outcome.id) == ("processed", None)

        refused, seen = dispatch_and_read(withdraw(account, 10_000), timeout=20)
        assert refused.status is CommandStatus.FAILED and seen == expected - 50

        cli = run_cli(
            "dispatch",
            "Deposit",
            "--tenant",
            str(TENANT),
            "--payload",
            json.dumps({"account_id": str(account), "amount": 50}),
            "--wait",
            "balances",
            env=cli_env(db),
        )
        assert cli.returncode == 0, cli.stderr
        assert cli.stdout.startswith("processed ")
        assert read_balance() == expected
        assert daemon.process.poll() is None


def cli_env(db: TestDatabase, **extra: str) -> dict[str, str]:
    return {
        "PROJECTORD_DATABASE_URL": db.url,
        "PROJECTORD_AGGREGATES": SAMPLE_AGGREGATES,
        "PROJECTORD_PROJECTIONS": SAMPLES,
        "PROJECTORD_LOG_FORMAT": "json",
        **extra,
    }


def test_dispatch_command_exit_statuses(db: TestDatabase, tmp_path: Path) -> None:
    account = uuid.uuid4()

    def cli(type_: str, payload: str, *args: str, env: dict[str, str] | None = None) -> Any:
        return run_cli(
            "dispatch",
            type_,
            "--tenant",
            str(TENANT),
            "--payload",
            payload,
            *args,
            env=env or cli_env(db),
        )

    command_id = str(uuid.uuid4())
    ok = cli("Deposit", json.dumps({"account_id": str(account), "amount": 40}), "--id", command_id)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith(f"consumed {command_id}: Deposit on {account}")

    again = cli(
        "Deposit",
        json.dumps({"account_id": str(account), "amount": 40}),
        "--id",
        command_id,
        "--json",
    )
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["status"] == "consumed"
    assert balance_from_events(db, account) == 40

    refused = cli("Withdraw", json.dumps({"account_id": str(account), "amount": 41}))
    assert refused.returncode == 1
    assert "failed: insufficient funds" in refused.stderr.splitlines()[-1]

    unknown = cli("Transfer", "{}")
    assert unknown.returncode == 1
    assert "unknown command type 'Transfer'" in unknown.stderr.splitlines()[-1]

    invalid = cli("Deposit", json.dumps({"account_id": str(account), "amount": "lots"}))
    assert invalid.returncode == 1
    assert "invalid payload for Deposit: amount:" in invalid.stderr.splitlines()[-1]

    not_json = cli("Deposit", "{amount: 5")
    assert not_json.returncode == 2
    assert not_json.stderr.strip().startswith("projectord: --payload is not valid JSON")

    not_object = cli("Deposit", "[5]")
    assert not_object.returncode == 2
    assert "--payload must be a JSON object" in not_object.stderr

    bad_tenant = run_cli("dispatch", "Deposit", "--tenant", "acme", env=cli_env(db))
    assert bad_tenant.returncode == 2 and "--tenant" in bad_tenant.stderr

    reused = cli(
        "Deposit", json.dumps({"account_id": str(account), "amount": 1}), "--id", command_id
    )
    assert reused.returncode == 1 and "already used for a different command" in reused.stderr

    no_aggregates = cli("Deposit", "{}", env={**cli_env(db), "PROJECTORD_AGGREGATES": ""})
    assert no_aggregates.returncode == 2 and "set `aggregates`" in no_aggregates.stderr

    broken = cli("Deposit", "{}", env={**cli_env(db), "PROJECTORD_AGGREGATES": "no_such_mod:x"})
    assert broken.returncode == 2
    assert broken.stderr.strip().startswith("projectord: aggregates: cannot import 'no_such_mod'")

    config = tmp_path / "projectord.toml"
    config.write_text(
        f'database_url = "{db.url}"\naggregates = ["{SAMPLE_AGGREGATES}"]\nlog_format = "json"\n'
    )
    from_file = run_cli(
        "dispatch",
        "Withdraw",
        "--config",
        str(config),
        "--tenant",
        str(TENANT),
        "--payload",
        json.dumps({"account_id": str(account), "amount": 15}),
        env={},
    )
    assert from_file.returncode == 0, from_file.stderr
    assert balance_from_events(db, account) == 25
    assert db.scalar("SELECT count(*) FROM projectord.events") == 2
