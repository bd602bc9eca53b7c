"""Aggregates: the write model that decides which events a command produces.

An aggregate is rebuilt from its own events (`apply` folds each into its state), then a command
handler decides on that state and returns the new events as `Change`s, or raises `CommandRejected`.
Handlers are plain methods marked with `@handles(PayloadModel)`; the payload model is a pydantic
`CommandPayload` that validates the command's payload and names the field holding the target
aggregate's id. Handlers do no I/O: the dispatcher loads, appends and records the outcome, so a
handler can be retried after a version conflict without side effects.

    class Account(Aggregate):
        aggregate_type = "account"

        @handles(Deposit)
        def deposit(self, command: Deposit) -> list[Change]:
            return [Change("Deposited", {"amount": command.amount})]

        def apply(self, event: Event) -> None:
            self.balance += event.payload["amount"]
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from projectord.event_store import Event
from projectord.specs import resolve_spec


class AggregateError(Exception):
    """An aggregate declared wrongly, or an `aggregates` entry that names none; for an operator."""


class CommandRejected(Exception):
    """Raised by a handler to refuse a command (a business rule): the command fails with this
    message and appends nothing."""


class InvalidPayload(Exception):
    """The command's payload does not validate against its payload model; one line."""


class CommandPayload(BaseModel):
    """Base of the pydantic models that validate command payloads.

    The command type is the class name unless `command_type` says otherwise; `aggregate_field`
    names the field that holds the id of the aggregate the command targets (a UUID).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    command_type: ClassVar[str | None] = None
    aggregate_field: ClassVar[str] = "aggregate_id"

    @classmethod
    def type_name(cls) -> str:
        return cls.command_type or cls.__name__

    @property
    def target_id(self) -> uuid.UUID:
        """The id of the aggregate this command targets."""
        value: uuid.UUID = getattr(self, self.aggregate_field)
        return value


@dataclass(frozen=True, slots=True)
class Change:
    """A new event a handler decided on; the dispatcher gives it its version and metadata."""

    type: str
    payload: Mapping[str, Any] = field(default_factory=dict)


HandlerMethod = TypeVar("HandlerMethod", bound=Callable[..., Any])


def handles(payload_model: type[CommandPayload]) -> Callable[[HandlerMethod], HandlerMethod]:
    """Mark an aggregate method as the handler of the commands `payload_model` validates."""

    def mark(method: HandlerMethod) -> HandlerMethod:
        method.__handles__ = payload_model  # type: ignore[attr-defined]
        return method

    return mark


@dataclass(frozen=True, slots=True)
class CommandHandler:
    """Where one command type goes: the aggregate class, the payload model and the method."""

    aggregate: type[Aggregate]
    payload_model: type[CommandPayload]
    method: str

    @property
    def command_type(self) -> str:
        return self.payload_model.type_name()

    def parse(self, payload: Mapping[str, Any]) -> CommandPayload:
        """The validated payload, or `InvalidPayload` listing every problem on one line."""
        try:
            return self.payload_model.model_validate(dict(payload))
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(part) for part in error['loc']) or 'payload'}: {error['msg']}"
                for error in exc.errors()
            )
            raise InvalidPayload(f"invalid payload for {self.command_type}: {problems}") from None


class Aggregate:
    """Base of aggregates. Subclasses set `aggregate_type`, mark handlers with `@handles` and
    override `apply` to fold their events into state."""

    aggregate_type: ClassVar[str]
    command_handlers: ClassVar[dict[str, CommandHandler]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        handlers: dict[str, CommandHandler] = {}
        for klass in reversed(cls.__mro__):
            for name, member in vars(klass).items():
                model = getattr(member, "__handles__", None)
                if model is None:
                    continue
                if not (isinstance(model, type) and issubclass(model, CommandPayload)):
                    raise AggregateError(
                        f"{cls.__name__}.{name}: @handles needs a CommandPayload subclass"
                    )
                target = model.model_fields.get(model.aggregate_field)
                if target is None or target.annotation is not uuid.UUID:
                    raise AggregateError(
                        f"{model.__name__} needs a UUID field {model.aggregate_field!r} naming"
                        " the target aggregate (or set `aggregate_field`)"
                    )
                handlers[model.type_name()] = CommandHandler(cls, model, name)
        cls.command_handlers = handlers

    def __init__(self, aggregate_id: uuid.UUID, tenant_id: uuid.UUID) -> None:
        self.id = aggregate_id
        self.tenant_id = tenant_id
        self.version = 0

    def apply(self, event: Event) -> None:
        """Fold one of this aggregate's events into its state. The default keeps no state."""

    def replay(self, events: Sequence[Event]) -> None:
        """Rebuild the state from the aggregate's events, in version order.

        Refuses an aggregate id that belongs to another tenant or to another kind of aggregate
        (events appended by plain SQL carry the empty type and are accepted)."""
        for event in events:
            if event.tenant_id != self.tenant_id:
                raise CommandRejected(f"aggregate {self.id} belongs to another tenant")
            if event.aggregate_type not in ("", self.aggregate_type):
                raise CommandRejected(
                    f"aggregate {self.id} is a {event.aggregate_type!r}, not a"
                    f" {self.aggregate_type!r}"
                )
            self.apply(event)
            self.version = event.version

    def handle(self, command: CommandPayload) -> list[Change]:
        """Decide: the new events `command` produces on the current state."""
        handler = self.command_handlers.get(command.type_name())
        if handler is None:
            raise CommandRejected(f"{type(self).__name__} has no handler for {command.type_name()}")
        return list(getattr(self, handler.method)(command))


class CommandRegistry:
    """Command type → handler, over every configured aggregate. One type has one handler."""

    def __init__(self, aggregates: Iterable[type[Aggregate]] = ()) -> None:
        self._handlers: dict[str, CommandHandler] = {}
        for aggregate in aggregates:
            self.register(aggregate)

    def register(self, aggregate: type[Aggregate]) -> None:
        if not getattr(aggregate, "aggregate_type", None):
            raise AggregateError(f"aggregate class {aggregate.__name__} has no `aggregate_type`")
        if not aggregate.command_handlers:
            raise AggregateError(f"aggregate class {aggregate.__name__} handles no command")
        for command_type, handler in aggregate.command_handlers.items():
            taken = self._handlers.get(command_type)
            if taken is not None and taken.aggregate is not aggregate:
                raise AggregateError(
                    f"command type {command_type!r} is handled by both"
                    f" {taken.aggregate.__name__} and {aggregate.__name__}"
                )
            self._handlers[command_type] = handler

    def route(self, command_type: str) -> CommandHandler | None:
        return self._handlers.get(command_type)

    @property
    def command_types(self) -> list[str]:
        return sorted(self._handlers)


def load_aggregates(specs: Iterable[str]) -> CommandRegistry:
    """Import every `module:attr` of the `aggregates` key: an Aggregate subclass, a list of them,
    or a zero-argument function returning one."""
    registry = CommandRegistry()
    for spec in specs:
        for item in resolve_spec(spec, "aggregates", AggregateError):
            if not (isinstance(item, type) and issubclass(item, Aggregate)):
                raise AggregateError(f"aggregates: {spec} holds {item!r}, not an Aggregate class")
            registry.register(item)
    return registry
