"""Service metrics: every metric declared once, with labels, rendered in Prometheus text format
at ``GET /metrics``. Thread-safe (worker threads count work, the event loop counts requests)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

Kind = Literal["counter", "gauge"]

# name -> (kind, labels, help). Counters are exported as hooklab_<name>_total, gauges as
# hooklab_<name>; a metric without labels shows 0 before its first change.
DECLARED: dict[str, tuple[Kind, tuple[str, ...], str]] = {
    "requests": ("counter", ("route", "status"), "HTTP requests answered"),
    "rejected": ("counter", ("code",), "requests refused with an error before or during work"),
    "cancelled": ("counter", ("op", "reason"), "work stopped early (disconnect or deadline)"),
    "work_units": ("counter", ("op",), "layers, decode steps and patching forwards executed"),
    "inflight_requests": ("gauge", ("op",), "operations running now"),
    "inflight_bytes": ("gauge", (), "estimated peak bytes of the operations running now"),
    "generations_started": ("counter", (), "generations started"),
    "generations_finished": ("counter", (), "generations that ran to the end"),
    "generations_failed": ("counter", (), "generations that ended with an error"),
    "generations_cancelled": ("counter", (), "generations stopped by a disconnect or deadline"),
    "generated_tokens": ("counter", (), "tokens generated (every batch row)"),
    "client_disconnects": ("counter", (), "clients that left before their response was complete"),
    "body_timeouts": ("counter", (), "request bodies that did not arrive within body_timeout_s"),
    "write_timeouts": ("counter", (), "responses dropped: the reader stalled past write_timeout_s"),
}

Labels = tuple[tuple[str, str], ...]


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[tuple[str, Labels], float] = {}

    def add(self, name: str, amount: float = 1, **labels: str) -> None:
        if name not in DECLARED or set(labels) != set(DECLARED[name][1]):
            raise KeyError(f"metric {name!r} with labels {sorted(labels)} is not declared")
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._values[key] = self._values.get(key, 0) + amount

    def value(self, name: str, **labels: str) -> float:
        with self._lock:
            return self._values.get((name, tuple(sorted(labels.items()))), 0)

    @contextmanager
    def running(self, op: str, estimated_bytes: int) -> Iterator[None]:
        """Count an operation (and its estimated memory) as in flight while the block runs."""
        self.add("inflight_requests", 1, op=op)
        self.add("inflight_bytes", estimated_bytes)
        try:
            yield
        finally:
            self.add("inflight_requests", -1, op=op)
            self.add("inflight_bytes", -estimated_bytes)

    def render(self) -> str:
        with self._lock:
            values = dict(self._values)
        lines = []
        for name, (kind, label_names, help_text) in DECLARED.items():
            exported = f"hooklab_{name}_total" if kind == "counter" else f"hooklab_{name}"
            lines += [f"# HELP {exported} {help_text}", f"# TYPE {exported} {kind}"]
            series = sorted(
                (labels, value) for (key, labels), value in values.items() if key == name
            )
            if not series and not label_names:
                series = [((), 0)]
            for labels, value in series:
                number = int(value) if float(value).is_integer() else value
                if labels:
                    text = ",".join(f'{key}="{_escape(value)}"' for key, value in labels)
                    lines.append(f"{exported}{{{text}}} {number}")
                else:
                    lines.append(f"{exported} {number}")
        return "\n".join(lines) + "\n"


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
