"""Event fan-out: every QMP event goes to every negotiated monitor.

The bus is synchronous and never blocks: :meth:`EventBus.emit` stamps the event and hands
it to each subscriber's sink at once, in subscription order. A sink must not block (a
connection's sink puts the message on its own outgoing queue), so a slow client never
holds up the daemon. Because events are handed over at the moment they are emitted, events
raised while a command runs are queued before that command's reply (QMP spec;
docs/qemu-behaviour/qmp-protocol.md §4).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

Event = dict[str, Any]
Sink = Callable[[Event], None]


def make_event(name: str, data: Mapping[str, Any] | None, now: float | None = None) -> Event:
    """Build an event envelope; ``data`` is left out when it is ``None``."""
    stamp = time.time() if now is None else now
    seconds = int(stamp)
    event: Event = {
        "timestamp": {"seconds": seconds, "microseconds": int((stamp - seconds) * 1_000_000)},
        "event": name,
    }
    if data is not None:
        event["data"] = dict(data)
    return event


class EventBus:
    """Delivers events to subscribed sinks; see the module docstring."""

    def __init__(self) -> None:
        self._sinks: dict[int, Sink] = {}
        self._next = 0

    def subscribe(self, sink: Sink) -> Callable[[], None]:
        """Start delivering events to ``sink``; returns the function that stops it."""
        key = self._next
        self._next += 1
        self._sinks[key] = sink

        def unsubscribe() -> None:
            self._sinks.pop(key, None)

        return unsubscribe

    def emit(self, name: str, data: Mapping[str, Any] | None = None) -> Event:
        """Send event ``name`` with ``data`` to every subscriber; returns the envelope."""
        event = make_event(name, data)
        for sink in list(self._sinks.values()):
            sink(event)
        return event
