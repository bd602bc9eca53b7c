"""Upcasting: an event's payload, stored in an old shape, handed to code in its current shape.

Every stored event carries the schema version of its payload (`Event.schema_version`, column
`schema_version` of the events table, default 1). Code registers one-step upcasters per event type
(v1→v2, v2→v3, ...) in an `Upcasters` registry; the current version of a type is one past its last
upcaster. When a payload is *decoded* (the first read of `Event.payload`), a payload older than the
current version goes through the chain of upcasters up to it, so projections (`handle` and `on`),
`Aggregate.apply` and dead-letter retries see only the current shape, and an event whose payload is
never read costs nothing more. Stored rows are never rewritten: the chain runs on every decode.

The registry is one per process, `installed()`: the current shape of an event type is a property of
the deployed code, so every path that decodes a payload (the runner's batches, a bisection, a
dead-letter retry, the dispatcher loading an aggregate) must agree on it. The command line installs
the registries the `upcasters` configuration key names (`"module:attr"`, like `projections`);
library code calls `install`. Appends through `EventStore` record the current version of each type.

An event whose version is newer than the code knows raises `SchemaVersionTooNew` (never a guess at
its shape): the runner stops that projection in state `failed` with that reason, whatever its
`on_error` (retrying or skipping cannot help: newer code can). An upcaster that raises raises
`UpcastFailed`, a handler failure like any other: retried, bisected, then paused or skipped.
docs/upcasting.md is the user's guide.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TypeVar

import orjson

from projectord.logs import get_logger
from projectord.specs import resolve_spec

log = get_logger("projectord.upcasting")

Payload = dict[str, Any]
# One step: the payload of version N (a fresh dict it may change in place) → that of version N+1.
Upcaster = Callable[[Payload], Payload]
U = TypeVar("U", bound=Upcaster)


class UpcastingError(Exception):
    """A registry declared wrongly (a gap in a chain, a step registered twice) or an `upcasters`
    entry that names none; one line, for an operator."""


class SchemaVersionTooNew(Exception):
    """An event's payload has a schema version this code has no upcaster chain to (newer code
    wrote it): its shape is unknown, and a guess could fold wrong data into a read model."""

    def __init__(self, event_type: str, version: int, current: int) -> None:
        super().__init__(
            f"event type {event_type!r} has payload schema version {version}, but this code knows"
            f" versions 1 to {current} only (newer code wrote it): deploy code that knows version"
            f" {version}, then resume"
        )
        self.event_type = event_type
        self.version = version
        self.current = current


class UpcastFailed(Exception):
    """An upcaster raised on an event's payload; the upcaster's own error is the `__cause__`."""

    def __init__(self, event_type: str, from_version: int, upcaster: Upcaster, error: Exception):
        name = getattr(upcaster, "__qualname__", repr(upcaster))
        super().__init__(
            f"upcaster {name} of {event_type!r} v{from_version}→v{from_version + 1} raised"
            f" {type(error).__name__}: {error}"
        )
        self.event_type = event_type
        self.from_version = from_version


class Upcasters:
    """A registry of one-step upcasters, per event type and version.

        upcasters = Upcasters()

        @upcasters.register("Deposited", from_version=1)
        def amount_in_cents(payload: dict) -> dict:
            payload["amount_cents"] = payload.pop("amount") * 100
            return payload

    A type's steps must start at version 1 and have no gap; a type with none is at version 1.
    """

    def __init__(self) -> None:
        self._steps: dict[str, dict[int, Upcaster]] = {}  # event type -> from version -> step
        self._current: dict[str, int] = {}
        # Per type with a complete chain, per stored version: the (from version, step) pairs
        # that take it to the current one; the current version maps to none. Compiled when a
        # step is added, so a decode does two dict lookups before the steps themselves.
        self._plans: dict[str, dict[int, tuple[tuple[int, Upcaster], ...]]] = {}

    def register(self, event_type: str, from_version: int) -> Callable[[U], U]:
        """Decorator: the function upcasts `event_type` payloads from `from_version` to the next."""

        def add(upcaster: U) -> U:
            self.add(event_type, from_version, upcaster)
            return upcaster

        return add

    def add(self, event_type: str, from_version: int, upcaster: Upcaster) -> None:
        """Register one step; refused if it is not a step up from a version >= 1, or is taken."""
        if not isinstance(event_type, str) or not event_type:
            raise UpcastingError(f"upcaster {upcaster!r}: the event type must be a non-empty name")
        if type(from_version) is not int or from_version < 1:
            raise UpcastingError(
                f"upcaster of {event_type!r}: from_version must be a whole number >= 1"
                f" (got {from_version!r})"
            )
        if not callable(upcaster):
            raise UpcastingError(f"upcaster of {event_type!r} v{from_version}: not callable")
        steps = self._steps.setdefault(event_type, {})
        if from_version in steps and steps[from_version] is not upcaster:
            raise UpcastingError(
                f"{event_type!r} has two upcasters from version {from_version}:"
                f" {_name(steps[from_version])} and {_name(upcaster)}"
            )
        steps[from_version] = upcaster
        self._compile(event_type)

    def update(self, other: Upcasters) -> None:
        """Add every step of `other` (the `upcasters` key may name several registries)."""
        for event_type, steps in other._steps.items():
            for from_version, upcaster in steps.items():
                self.add(event_type, from_version, upcaster)

    def _compile(self, event_type: str) -> None:
        steps = self._steps[event_type]
        current = max(steps) + 1
        self._current[event_type] = current
        # A chain with a gap is left out until the gap is filled (`check` reports it).
        if len(steps) == current - 1:
            chain = tuple((v, steps[v]) for v in range(1, current))
            self._plans[event_type] = {v: chain[v - 1 :] for v in range(1, current + 1)}
        else:
            self._plans.pop(event_type, None)

    def check(self) -> None:
        """Refuse a chain with a gap: events of the missing version could not be read."""
        for event_type, steps in self._steps.items():
            missing = [v for v in range(1, max(steps)) if v not in steps]
            if missing:
                raise UpcastingError(
                    f"{event_type!r} has upcasters up to version {max(steps) + 1} but none from"
                    f" version {', '.join(map(str, missing))}: every step from version 1 is needed"
                )

    def current_version(self, event_type: str) -> int:
        """The version of `event_type`'s payload this code writes and handlers see."""
        return self._current.get(event_type, 1)

    @property
    def event_types(self) -> dict[str, int]:
        """Every type with upcasters, and its current version."""
        return dict(self._current)

    def upcast(self, event_type: str, version: int, payload: Payload) -> Payload:
        """`payload`, of `version`, in the current shape. The caller hands over a fresh dict, which
        the steps may change. Raises `SchemaVersionTooNew` or `UpcastFailed`."""
        plans = self._plans.get(event_type)
        if plans is None:
            if version == 1 and event_type not in self._steps:
                return payload  # a type no upcaster knows is at version 1
            self.check()  # a gap in the chain: raises
            raise SchemaVersionTooNew(event_type, version, self.current_version(event_type))
        steps = plans.get(version)
        if steps is None:
            raise SchemaVersionTooNew(event_type, version, self._current[event_type])
        for from_version, step in steps:
            try:
                payload = step(payload)
            except Exception as exc:
                raise UpcastFailed(event_type, from_version, step, exc) from exc
            if not isinstance(payload, dict):
                error = TypeError(f"returned {type(payload).__name__}, not a dict")
                raise UpcastFailed(event_type, from_version, step, error)
        return payload

    def __bool__(self) -> bool:
        return bool(self._steps)

    def __repr__(self) -> str:
        types = ", ".join(f"{t}: v{v}" for t, v in sorted(self._current.items()))
        return f"<Upcasters {types or 'empty'}>"


def _name(upcaster: Upcaster) -> str:
    return getattr(upcaster, "__qualname__", repr(upcaster))


# The process's registry. Empty: every type is at version 1, and a newer event is refused.
_installed = Upcasters()


def installed() -> Upcasters:
    """The registry payloads are decoded with in this process."""
    return _installed


def install(registry: Upcasters) -> Upcasters:
    """Make `registry` the process's (checked first); returns the one it replaces.

    Done once at start-up, before any event is decoded: an event decoded earlier keeps the shape
    it was decoded to."""
    global _installed
    registry.check()
    previous, _installed = _installed, registry
    if registry:
        log.info("upcasters.installed", event_types=registry.event_types)
    return previous


@contextmanager
def installing(registry: Upcasters) -> Iterator[Upcasters]:
    """`install` for a block (a script, a test), then the previous registry again."""
    previous = install(registry)
    try:
        yield registry
    finally:
        install(previous)


def load_upcasters(specs: Iterable[str]) -> Upcasters:
    """One registry of every `module:attr` of the `upcasters` key: an `Upcasters`, a list of them,
    or a zero-argument function returning either. Checked, not installed."""
    merged = Upcasters()
    for spec in specs:
        for item in resolve_spec(spec, "upcasters", UpcastingError):
            if not isinstance(item, Upcasters):
                raise UpcastingError(f"upcasters: {spec} holds {item!r}, not an Upcasters registry")
            merged.update(item)
    merged.check()
    return merged


def decode_payload(event_type: str, version: int, raw: Mapping[str, Any] | str | bytes) -> Payload:
    """The payload of a stored event in the current shape: JSON text is parsed (the runner fetches
    it so), a mapping is used as is unless an upcaster needs it, then it is copied first (the
    caller's dict must not change, nor a retry see what a failed upcaster left of it)."""
    if isinstance(raw, (str, bytes)):
        payload: Payload = orjson.loads(raw)
        # Version 1 of a type no step is registered for is current: `upcast`'s first case,
        # decided here without its call, which was half of a catch-up's decode. `_current`
        # names every type with a step, a type whose chain has a gap included.
        if version == 1 and event_type not in _installed._current:
            return payload
        return _installed.upcast(event_type, version, payload)
    if version == _installed.current_version(event_type):
        return raw  # type: ignore[return-value]
    return _installed.upcast(event_type, version, copy.deepcopy(dict(raw)))


def too_new(error: BaseException | None) -> SchemaVersionTooNew | None:
    """The `SchemaVersionTooNew` behind `error` (a handler may have wrapped it), if any."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, SchemaVersionTooNew):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None
