"""projectord: keeps the read models of an event-sourced system up to date on PostgreSQL."""

from projectord.event_store import ConcurrencyError, Event, EventStore, NewEvent
from projectord.projection import Projection, ProjectionError, Table
from projectord.upcasting import Upcasters

__all__ = [
    "ConcurrencyError",
    "Event",
    "EventStore",
    "NewEvent",
    "Projection",
    "ProjectionError",
    "Table",
    "Upcasters",
]
