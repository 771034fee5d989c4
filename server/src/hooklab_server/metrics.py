"""Service metrics, each declared once with its labels, exported with ``prometheus_client`` in
Prometheus text format at ``GET /metrics``. One registry per application (tests run several).
Per-key series carry the key's *name*, never the key."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# Without this every counter also exports a *_created series per label set.
prometheus_client.disable_created_metrics()

Kind = Literal["counter", "gauge", "histogram"]

# name -> (kind, labels, help). Counters are exported as hooklab_<name>_total.
# Counted where requests arrive (the API tier, scaled out):
API_SIDE: dict[str, tuple[Kind, tuple[str, ...], str]] = {
    "requests": ("counter", ("route", "status", "key"), "HTTP requests answered"),
    "request_seconds": ("histogram", ("route",), "time from request to the end of the response"),
    "rejected": ("counter", ("code",), "requests refused with an error before or during work"),
    "tokens": ("counter", ("key", "op"), "tokens run through the model (prompt + generated)"),
    "response_bytes": ("counter", ("key",), "response body bytes sent"),
    "client_disconnects": ("counter", (), "clients that left before their response was complete"),
    "body_timeouts": ("counter", (), "request bodies that did not arrive within body_timeout_s"),
    "write_timeouts": ("counter", (), "responses dropped: the reader stalled past write_timeout_s"),
    "quota_refusals": ("counter", ("key", "quota"), "requests refused by a per-key quota"),
}
# Counted where the model runs (a worker process, scaled out; the API reports each live
# worker's series with a ``worker`` label):
ENGINE_SIDE: dict[str, tuple[Kind, tuple[str, ...], str]] = {
    "queue_seconds": (
        "histogram",
        ("op",),
        "time work waited for the device before its first unit",
    ),
    "run_seconds": ("histogram", ("op",), "time the device spent on a request's units"),
    "gather_seconds": ("histogram", (), "time a forward waited to gather others to merge with"),
    "batch_requests": ("histogram", (), "requests merged into one forward"),
    "batch_rows": ("histogram", (), "rows of a merged forward"),
    "decode_rows": ("histogram", (), "rows of the decode pool in one step (continuous batching)"),
    "decode_step_seconds": ("histogram", (), "time of one decode step of the pool"),
    "join_seconds": ("histogram", (), "time of a generation's prefill into the pool"),
    "cancelled": ("counter", ("op", "reason"), "work stopped early (disconnect or deadline)"),
    "work_units": ("counter", ("op",), "layers, decode steps and patching forwards executed"),
    "inflight_requests": ("gauge", ("op",), "operations submitted and not yet finished"),
    "inflight_bytes": ("gauge", (), "estimated peak bytes reserved by admitted operations"),
    "decode_pool_bytes": ("gauge", (), "memory of the decode pool's KV cache (made once)"),
    "running_jobs": ("gauge", (), "operations admitted (started, between units) and not finished"),
    "queue_depth": ("gauge", (), "operations waiting for their first unit"),
    "generations_started": ("counter", (), "generations started"),
    "generations_finished": ("counter", (), "generations that ran to the end"),
    "generations_failed": ("counter", (), "generations that ended with an error"),
    "generations_cancelled": ("counter", (), "generations stopped by a disconnect or deadline"),
    "generated_tokens": ("counter", (), "tokens generated (every batch row)"),
}
DECLARED = API_SIDE | ENGINE_SIDE
_TYPES: dict[Kind, Any] = {"counter": Counter, "gauge": Gauge, "histogram": Histogram}
# Histograms of counts, not seconds.
_BUCKETS = {
    name: (1, 2, 4, 8, 16, 32, 64, 128) for name in ("batch_requests", "batch_rows", "decode_rows")
}


class _Sampled(Collector):
    """A gauge read when scraped, e.g. stored bytes per key from the store."""

    def __init__(
        self, name: str, help_text: str, label: str, read: Callable[[], Mapping[str, float]]
    ):
        self.name, self.help_text, self.label, self.read = name, help_text, label, read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(self.name, self.help_text, labels=[self.label])
        for value, amount in sorted(self.read().items()):
            family.add_metric([value], amount)
        yield family


# One engine-side family as a worker reports it: (name, type, help, samples), a sample being
# (sample name, labels, value) — plain data, so it travels as msgpack.
Sample = tuple[str, dict[str, str], float]
Family = tuple[str, str, str, list[Sample]]


class _FromWorkers(Collector):
    """The engine-side families of every live worker, each series labelled with its worker."""

    def __init__(self, read: Callable[[], Mapping[str, list[Family]]]) -> None:
        self.read = read

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        for worker, families in sorted(self.read().items()):
            for name, kind, help_text, samples in families:
                family = merged.setdefault(name, Metric(name, help_text, kind))
                for sample_name, labels, value in samples:
                    family.add_sample(sample_name, {**labels, "worker": worker}, value)
        yield from merged.values()


class Metrics:
    """Thread-safe (prometheus_client locks each series).

    ``from_workers`` (the API tier of a scaled-out deployment, where no model runs): the
    engine-side families are read from the workers' reports at every scrape instead."""

    def __init__(self, from_workers: Callable[[], Mapping[str, list[Family]]] | None = None):
        self.registry = CollectorRegistry()
        self._metrics: dict[str, Any] = {}
        if from_workers is not None:
            self.registry.register(_FromWorkers(from_workers))
        for name, (kind, labels, help_text) in DECLARED.items():
            if from_workers is not None and name in ENGINE_SIDE:
                continue
            options: dict[str, Any] = {"registry": self.registry}
            if name in _BUCKETS:
                options["buckets"] = _BUCKETS[name]
            self._metrics[name] = _TYPES[kind](f"hooklab_{name}", help_text, labels, **options)

    def _series(self, name: str, labels: dict[str, str]) -> Any:
        metric = self._metrics[name]
        expected = DECLARED[name][1]
        if set(labels) != set(expected):
            raise KeyError(f"metric {name!r} has labels {expected}, not {sorted(labels)}")
        return metric.labels(**labels) if labels else metric

    def add(self, name: str, amount: float = 1, **labels: str) -> None:
        self._series(name, labels).inc(amount)

    def set(self, name: str, value: float, **labels: str) -> None:
        """A gauge's current value."""
        self._series(name, labels).set(value)

    def observe(self, name: str, value: float, **labels: str) -> None:
        self._series(name, labels).observe(value)

    def value(self, name: str, **labels: str) -> float:
        kind = DECLARED[name][0]
        sample = f"hooklab_{name}_total" if kind == "counter" else f"hooklab_{name}"
        return self.registry.get_sample_value(sample, labels) or 0.0

    def sampled(
        self, name: str, help_text: str, label: str, read: Callable[[], Mapping[str, float]]
    ) -> None:
        """Export ``hooklab_<name>{label=…}`` from ``read()`` at every scrape."""
        self.registry.register(_Sampled(f"hooklab_{name}", help_text, label, read))

    def engine_families(self) -> list[Family]:
        """This process's engine-side families, as a worker reports them to the API."""
        wanted = {f"hooklab_{name}" for name in ENGINE_SIDE}
        return [
            (family.name, family.type, family.documentation,
             [(sample.name, dict(sample.labels), sample.value) for sample in family.samples])
            for family in self.registry.collect()
            if family.name in wanted
        ]  # fmt: skip

    def render(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)
