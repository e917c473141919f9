"""A fast writer of the Prometheus text format for our own metric families.

``prometheus_client.generate_latest`` validates and escapes every label name of every sample, which
costs ~10 us a sample: 60 ms for 64 replicas x 8 devices. Our label names are fixed constants, so a
family built here writes its samples directly, byte-for-byte as ``generate_latest`` would (a test
checks that), and can still be handed to ``prometheus_client`` as an ordinary ``Metric``.
"""

from __future__ import annotations

import bisect
import itertools
import threading
from collections.abc import Iterable, Sequence

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString


def _count(n: int) -> str:
    """``floatToGoString(float(n))`` for counts, without the float round trip below a million."""
    return f"{n}.0" if 0 <= n < 1_000_000 else floatToGoString(n)


def _escape(value: str) -> str:
    if "\\" in value or '"' in value or "\n" in value:
        return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
    return value


class Family:
    """A counter or gauge family: label names fixed at creation, rows of (label values, value)."""

    def __init__(self, name: str, doc: str, kind: str, labels: Sequence[str]) -> None:
        if kind not in ("counter", "gauge"):
            raise ValueError(f"unsupported metric type {kind!r}")
        self.name, self.doc, self.kind, self.labels = name, doc, kind, tuple(labels)
        self.rows: list[tuple[tuple[str, ...], float]] = []
        self._order = sorted(range(len(self.labels)), key=self.labels.__getitem__)

    def add(self, values: Sequence[str], value: float) -> None:
        """Append one row: label values in the family's label order, and the value."""
        self.rows.append((tuple(values), value))

    def metric(self) -> Metric:
        """The family as a prometheus_client metric (for ``collect`` and ``generate_latest``)."""
        cls = CounterMetricFamily if self.kind == "counter" else GaugeMetricFamily
        fam = cls(self.name, self.doc, labels=list(self.labels))
        for values, value in self.rows:
            fam.add_metric(list(values), value)
        return fam

    def text(self, cache: dict[tuple[str, ...], str] | None = None) -> str:
        """Exposition text; ``cache`` shares label strings between families with the same labels."""
        cache = {} if cache is None else cache
        sample = f"{self.name}_total" if self.kind == "counter" else self.name
        doc = self.doc.replace("\\", r"\\").replace("\n", r"\n")
        out = [f"# HELP {sample} {doc}\n# TYPE {sample} {self.kind}\n"]
        for values, value in self.rows:
            key = (*self.labels, *values)
            labels = cache.get(key)
            if labels is None:
                labels = ",".join(f'{self.labels[i]}="{_escape(values[i])}"' for i in self._order)
                cache[key] = labels
            out.append(f"{sample}{{{labels}}} {floatToGoString(value)}\n")
        return "".join(out)


class FastCollector(Collector):
    """A collector whose families can be written without prometheus_client's per-sample checks."""

    def families(self) -> list[Family]:
        """The families to export at this scrape (subclasses override; none by default)."""
        return []

    def collect(self) -> Iterable[Metric]:
        """The families as prometheus_client metrics, for registries that do not render text directly."""
        return [f.metric() for f in self.families()]

    def describe(self) -> Iterable[Metric]:
        """Nothing: no describe-time metrics, so registering does not collect."""
        return ()

    _label_cache: dict[tuple[str, ...], str] | None = None

    def render_text(self) -> str:
        """The families in Prometheus text format, reusing label strings cached across scrapes."""
        # Label strings are kept between scrapes (the same devices come back); bounded against churn.
        if self._label_cache is None or len(self._label_cache) > 200_000:
            self._label_cache = {}
        return "".join(f.text(self._label_cache) for f in self.families())


class ExporterRegistry(CollectorRegistry):
    """A registry whose :meth:`render` writes :class:`FastCollector` families directly.

    ``generate_latest(registry)`` still works (slower) and gives the same text.
    """

    def __init__(self) -> None:
        super().__init__()
        self._fast: list[FastCollector] = []
        self._rest = CollectorRegistry()

    def register(self, collector: Collector) -> None:
        """Register the collector; fast collectors are also rendered directly by :meth:`render`."""
        super().register(collector)
        if isinstance(collector, FastCollector):
            self._fast.append(collector)
        else:
            self._rest.register(collector)

    def unregister(self, collector: Collector) -> None:
        """Unregister the collector from this registry and from the direct or fallback rendering."""
        super().unregister(collector)
        if isinstance(collector, FastCollector):
            self._fast.remove(collector)
        else:
            self._rest.unregister(collector)

    def render(self) -> bytes:
        """Prometheus text of every collector: fast ones written directly, the rest through prometheus_client."""
        fast = "".join(c.render_text() for c in self._fast).encode()
        return fast + generate_latest(self._rest)


class HistogramCollector(FastCollector):
    """Histograms with one label, written directly (prometheus_client's cost ~27 samples per label value).

    Same samples as ``prometheus_client.Histogram`` (``_bucket`` with ``le``, ``_count``, ``_sum``),
    without the optional ``_created`` series.
    """

    def __init__(self, name: str, doc: str, label: str, buckets: Sequence[float]) -> None:
        self.name, self.doc, self.label = name, doc, label
        self.bounds = tuple(sorted(float(b) for b in buckets))
        self._les = [floatToGoString(b) for b in self.bounds] + ["+Inf"]
        self._counts: dict[str, list[int]] = {}
        self._sums: dict[str, float] = {}
        self._prefixes: dict[str, list[str]] = {}
        self._lock = threading.Lock()

    def observe(self, label_value: str, value: float) -> None:
        """Count one observation of ``value`` in the histogram of ``label_value`` (thread-safe)."""
        i = bisect.bisect_left(self.bounds, value)  # le is inclusive: value == bound goes in that bucket
        with self._lock:
            counts = self._counts.setdefault(label_value, [0] * (len(self.bounds) + 1))
            counts[i] += 1
            self._sums[label_value] = self._sums.get(label_value, 0.0) + value

    def _snapshot(self) -> list[tuple[str, list[int], float]]:
        with self._lock:
            return [(k, list(itertools.accumulate(c)), self._sums[k]) for k, c in self._counts.items()]

    def collect(self) -> Iterable[Metric]:
        """The histograms as one prometheus_client metric family."""
        fam = HistogramMetricFamily(self.name, self.doc, labels=[self.label])
        for key, cum, total in self._snapshot():
            fam.add_metric([key], list(zip(self._les, map(float, cum), strict=True)), total)
        return [fam]

    def render_text(self) -> str:
        """The histograms in Prometheus text format (``_bucket``, ``_count``, ``_sum`` per label value)."""
        doc = self.doc.replace("\\", r"\\").replace("\n", r"\n")
        out = [f"# HELP {self.name} {doc}\n# TYPE {self.name} histogram\n"]
        for key, cum, total in self._snapshot():
            lv = _escape(key)
            prefixes = self._prefixes.get(key)
            if prefixes is None:
                prefixes = [f'{self.name}_bucket{{le="{le}",{self.label}="{lv}"}} ' for le in self._les]
                self._prefixes[key] = prefixes
            out.extend(f"{p}{_count(n)}\n" for p, n in zip(prefixes, cum, strict=True))
            out.append(f'{self.name}_count{{{self.label}="{lv}"}} {_count(cum[-1])}\n')
            out.append(f'{self.name}_sum{{{self.label}="{lv}"}} {floatToGoString(total)}\n')
        return "".join(out)
