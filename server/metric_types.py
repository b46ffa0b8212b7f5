"""Counters, gauges and histograms that cost little on the request path.

prometheus_client's metrics take a lock per update (two per histogram observation) and
walk the buckets in Python; a small request updates about ten of them, which was a
quarter of the server's own work per request. These keep one cell per (series, thread):
only its thread writes it, so an update is a few plain Python operations and no lock,
and a scrape sums the cells (reading another thread's cell is safe under the GIL; a
scrape may miss updates made while it runs, never lose them). Sums are exact whichever
thread increments or decrements, so a gauge may go up on one thread and down on another.

They are exposed through a collector, under the same names, labels, buckets and
exemplars as prometheus_client's own types (no `_created` samples). Cells of threads that
have ended are kept (their counts must not vanish); the server's threads are long-lived.
"""

from __future__ import annotations

import threading
import time
from bisect import bisect_left
from typing import Any, Iterable, Optional, Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.samples import Exemplar
from prometheus_client.utils import floatToGoString


class _Series:
    """One labelled series: a cell per writing thread."""

    __slots__ = ("_local", "_cells", "_lock", "_size")

    def __init__(self, size: int):
        self._local = threading.local()
        self._cells: list[list[float]] = []
        self._lock = threading.Lock()
        self._size = size

    def _cell(self) -> list[float]:
        try:
            cell: list[float] = self._local.cell
        except AttributeError:
            cell = self._local.cell = [0.0] * self._size
            with self._lock:
                self._cells.append(cell)
        return cell

    def totals(self) -> list[float]:
        with self._lock:
            cells = list(self._cells)
        totals = [0.0] * self._size
        for cell in cells:
            for i, v in enumerate(cell):
                totals[i] += v
        return totals


class GaugeSeries(_Series):
    __slots__ = ()

    def __init__(self) -> None:
        super().__init__(1)

    def inc(self, amount: float = 1.0) -> None:
        try:
            self._local.cell[0] += amount
        except AttributeError:
            self._cell()[0] += amount

    def dec(self, amount: float = 1.0) -> None:
        self.inc(-amount)


class CounterSeries(GaugeSeries):
    __slots__ = ()

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("counters can only be incremented by non-negative amounts")
        super().inc(amount)


class HistogramSeries(_Series):
    """Cells hold one count per bucket (the last is +Inf), then the sum."""

    __slots__ = ("_bounds", "exemplars")

    def __init__(self, bounds: tuple[float, ...]):
        super().__init__(len(bounds) + 2)
        self._bounds = bounds
        self.exemplars: list[Optional[Exemplar]] = [None] * (len(bounds) + 1)

    def observe(self, value: float, exemplar: Optional[dict[str, str]] = None) -> None:
        try:
            cell = self._local.cell
        except AttributeError:
            cell = self._cell()
        cell[-1] += value
        if value != value:
            return  # NaN: in the sum, in no bucket (as prometheus_client does)
        i = bisect_left(self._bounds, value)  # the first bucket whose bound is >= value
        cell[i] += 1
        # OpenMetrics caps an exemplar's labels at 128 characters; a longer one (the request
        # id is the caller's) is dropped rather than break the exposition.
        if exemplar is not None and sum(len(k) + len(v) for k, v in exemplar.items()) <= 128:
            self.exemplars[i] = Exemplar(exemplar, value, time.time())  # the latest one wins


class _Family:
    exposed_as: Any = None  # the prometheus_client family type of single-value series

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = ()):
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._series: dict[tuple[str, ...], Any] = {}  # keyed by str values (see labels)
        self._lock = threading.Lock()
        if not self.labelnames:
            self._only = self.labels()  # exposed (at zero) from the start

    def _new(self) -> Any:
        raise NotImplementedError

    def labels(self, *values: Any) -> Any:
        series = self._series.get(values)
        if series is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values}")
            key = tuple(str(v) for v in values)  # label values are strings, as in prometheus_client
            with self._lock:
                series = self._series.get(key)
                if series is None:
                    series = self._series[key] = self._new()
        return series

    def _items(self) -> list[tuple[tuple[str, ...], Any]]:
        with self._lock:
            return list(self._series.items())

    def collect(self) -> Metric:
        family = self.exposed_as(self.name, self.documentation, labels=self.labelnames)
        for values, series in self._items():
            family.add_metric(values, series.totals()[0])
        return family


class Counter(_Family):
    """Exposed as `<name>_total`, like prometheus_client's Counter."""

    exposed_as = CounterMetricFamily

    def _new(self) -> CounterSeries:
        return CounterSeries()


class Gauge(_Family):
    """Without labels the family is its own single series: `gauge.inc()`."""

    exposed_as = GaugeMetricFamily

    def _new(self) -> GaugeSeries:
        return GaugeSeries()

    def inc(self, amount: float = 1.0) -> None:
        self._only.inc(amount)

    def dec(self, amount: float = 1.0) -> None:
        self._only.dec(amount)


class Histogram(_Family):
    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], buckets: Sequence[float]):
        if "le" in labelnames:
            raise ValueError("a histogram can't have a label named le")
        bounds = tuple(float(b) for b in buckets)
        if list(bounds) != sorted(set(bounds)) or bounds[-1] == float("inf"):
            raise ValueError("buckets must be increasing and finite (+Inf is added)")
        self._bounds = bounds
        self._les = [floatToGoString(b) for b in bounds] + ["+Inf"]
        super().__init__(name, documentation, labelnames)  # last: it may create the series

    def _new(self) -> HistogramSeries:
        return HistogramSeries(self._bounds)

    def observe(self, value: float, exemplar: Optional[dict[str, str]] = None) -> None:
        """Without labels the family is its own single series, as for Gauge."""
        self._only.observe(value, exemplar)

    def collect(self) -> Metric:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, series in self._items():
            totals = series.totals()
            buckets: list[Any] = []
            cumulative = 0.0
            for le, count, exemplar in zip(self._les, totals, series.exemplars):
                cumulative += count
                buckets.append((le, cumulative, exemplar) if exemplar is not None else (le, cumulative))
            family.add_metric(values, buckets, totals[-1])
        return family


class Collector:
    """Registers families with a prometheus_client registry (as one collector)."""

    def __init__(self) -> None:
        self._families: list[_Family] = []

    def add(self, family: Any) -> Any:
        self._families.append(family)
        return family

    def collect(self) -> Iterable[Metric]:
        for family in self._families:
            yield family.collect()
