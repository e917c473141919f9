"""Arrival processes (seeded, registered by ``kind``) and the request specs they produce."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, Literal, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator


@dataclass(frozen=True)
class RequestSpec:
    """One request to send in a point: when (s from the point's start), prompt length and output cap in tokens."""

    t_s: float
    """Intended send time, seconds from the start of the point."""
    prompt_tokens: int
    max_output_tokens: int


class LengthSampler(Protocol):
    """A token-length distribution: draws ``n`` lengths from the generator."""

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """Draw ``n`` token lengths (int64 array) with ``rng``."""


class ArrivalProcess(Protocol):
    """An open-loop arrival process: request send times for a rate and a sending window."""

    def times(self, rng: np.random.Generator, rate_rps: float, duration_s: float) -> Iterator[float]:
        """Send times (s from the point's start, increasing, below ``duration_s``) at a mean of ``rate_rps`` req/s."""


class PoissonArrivals(BaseModel):
    """Exponential inter-arrival times (memoryless open-loop traffic)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    kind: Literal["poisson"] = "poisson"

    def times(self, rng: np.random.Generator, rate_rps: float, duration_s: float) -> Iterator[float]:
        """Send times with exponential gaps of mean ``1 / rate_rps`` s, until ``duration_s``."""
        t = 0.0
        while True:
            t += rng.exponential(1.0 / rate_rps)
            if t >= duration_s:
                return
            yield t


class ConstantArrivals(BaseModel):
    """Evenly spaced requests (the first at t=0)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    kind: Literal["constant"] = "constant"

    def times(self, rng: np.random.Generator, rate_rps: float, duration_s: float) -> Iterator[float]:
        """Send times ``i / rate_rps`` from t=0 while below ``duration_s``."""
        n = int(np.floor(duration_s * rate_rps - 1e-9)) + 1
        for i in range(n):
            yield i / rate_rps


class GammaArrivals(BaseModel):
    """Gamma inter-arrival times with coefficient of variation ``cv`` (1 = Poisson, > 1 = bursty)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    kind: Literal["gamma"] = "gamma"
    cv: float = Field(default=2.0, gt=0, le=20, description="Burstiness: std/mean of inter-arrival gaps.")

    def times(self, rng: np.random.Generator, rate_rps: float, duration_s: float) -> Iterator[float]:
        """Send times with gamma gaps of mean ``1 / rate_rps`` s and coefficient of variation ``cv`` (burstiness)."""
        shape = 1.0 / self.cv**2
        scale = 1.0 / (rate_rps * shape)
        t = 0.0
        while True:
            t += rng.gamma(shape, scale)
            if t >= duration_s:
                return
            yield t


class RateProfile(BaseModel):
    """A non-homogeneous Poisson process whose rate follows a shape over the point, scaled so that the mean
    rate over ``[0, duration_s)`` is the sweep's ``rate_rps``. Sampled exactly by thinning (Lewis-Shedler):
    candidates at the peak rate, each kept with probability rate(t) / peak."""

    def shape(self, t: np.ndarray, duration_s: float) -> np.ndarray:  # relative rate at times t
        """Relative rate at the times ``t`` (s) of a point lasting ``duration_s``; subclasses define it."""
        raise NotImplementedError

    def shape_mean(self, duration_s: float) -> float:  # mean of the shape over [0, duration_s)
        """Mean of the shape over ``[0, duration_s)``: what the rate is scaled by to average ``rate_rps``."""
        raise NotImplementedError

    def shape_max(self, duration_s: float) -> float:
        """Maximum of the shape over the point: the thinning's candidate rate."""
        raise NotImplementedError

    def rate_at(self, t: np.ndarray | float, rate_rps: float, duration_s: float) -> np.ndarray:
        """The intensity (requests/s) at times ``t``."""
        mean = self.shape_mean(duration_s)
        return rate_rps * self.shape(np.asarray(t, dtype=float), duration_s) / mean

    def times(self, rng: np.random.Generator, rate_rps: float, duration_s: float) -> Iterator[float]:
        """Send times by thinning candidates at the peak rate, so the mean rate over the point is ``rate_rps``."""
        scale = rate_rps / self.shape_mean(duration_s)
        peak = scale * self.shape_max(duration_s)
        t = 0.0
        while True:
            t += rng.exponential(1.0 / peak)
            if t >= duration_s:
                return
            # One uniform per candidate, drawn whether or not it is kept: the stream stays aligned.
            if rng.random() * peak < scale * float(self.shape(np.asarray([t]), duration_s)[0]):
                yield t


class RampArrivals(RateProfile):
    """Rate changing linearly from ``start`` to ``end`` (relative levels) over the point; the mean is the
    sweep's rate, so ``start: 0, end: 1`` ramps from 0 to twice ``rate_rps``."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    kind: Literal["ramp"] = "ramp"
    start: float = Field(ge=0, description="Relative rate at t = 0.")
    end: float = Field(ge=0, description="Relative rate at the end of the point.")

    @model_validator(mode="after")
    def _some_traffic(self) -> RampArrivals:
        if self.start == 0 and self.end == 0:
            raise ValueError("ramp start and end are both 0: no request would be sent; give end > 0")
        return self

    def shape(self, t: np.ndarray, duration_s: float) -> np.ndarray:
        """Relative rate moving linearly from ``start`` to ``end`` over the point."""
        return self.start + (self.end - self.start) * np.clip(t / duration_s, 0.0, 1.0)

    def shape_mean(self, duration_s: float) -> float:
        """Mean of a linear ramp: the average of its two ends."""
        return (self.start + self.end) / 2

    def shape_max(self, duration_s: float) -> float:
        """The ramp's higher end."""
        return max(self.start, self.end)


class DiurnalArrivals(RateProfile):
    """Sinusoidal rate ``1 + amplitude * sin(2 pi (t / period_s + phase))``, e.g. a day compressed into a
    point; ``phase`` is the fraction of a period at t = 0 (0: mean and rising, 0.25: peak, 0.75: trough)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    kind: Literal["diurnal"] = "diurnal"
    period_s: float = Field(gt=0, description="Length of one cycle, seconds.")
    amplitude: float = Field(default=0.5, ge=0, lt=1, description="Swing relative to the mean (0 to < 1).")
    phase: float = Field(default=0.0, ge=0, lt=1, description="Fraction of a period at t = 0.")

    def shape(self, t: np.ndarray, duration_s: float) -> np.ndarray:
        """Relative rate ``1 + amplitude * sin`` of the cycle position (period ``period_s``, ``phase`` in cycles)."""
        return 1.0 + self.amplitude * np.sin(2 * np.pi * (t / self.period_s + self.phase))

    def shape_mean(self, duration_s: float) -> float:
        """Exact mean of the sinusoid over ``[0, duration_s)``, partial cycles included."""
        # Exact integral over [0, duration_s): a point need not hold whole cycles.
        w = 2 * np.pi / self.period_s
        a0 = 2 * np.pi * self.phase
        return 1.0 + self.amplitude * (np.cos(a0) - np.cos(w * duration_s + a0)) / (w * duration_s)

    def shape_max(self, duration_s: float) -> float:
        """The sinusoid's peak, ``1 + amplitude``."""
        return 1.0 + self.amplitude


class PiecewiseArrivals(RateProfile):
    """Rate interpolated linearly between ``points`` ``[t_s, level]`` (relative levels; the last level holds
    to the end of the point), e.g. ``[[0, 1], [60, 3], [120, 1]]`` for a burst one minute in."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    kind: Literal["piecewise"] = "piecewise"
    points: list[tuple[float, float]] = Field(min_length=1, description="[t_s, relative rate] pairs.")

    @model_validator(mode="after")
    def _valid_points(self) -> PiecewiseArrivals:
        ts = [t for t, _ in self.points]
        if ts[0] != 0:
            raise ValueError(f"piecewise points must start at t = 0 (first point is at t = {ts[0]:g})")
        for i in range(1, len(ts)):
            if ts[i] <= ts[i - 1]:
                raise ValueError(
                    f"piecewise points must have increasing times: point {i} (t = {ts[i]:g}) is not after "
                    f"point {i - 1} (t = {ts[i - 1]:g})"
                )
        for i, (t, level) in enumerate(self.points):
            if level < 0 or not np.isfinite(level):
                raise ValueError(f"piecewise point {i} (t = {t:g}) has rate level {level:g}; levels must be >= 0")
        if all(level == 0 for _, level in self.points):
            raise ValueError("every piecewise rate level is 0: no request would be sent")
        return self

    def shape(self, t: np.ndarray, duration_s: float) -> np.ndarray:
        """Relative rate linearly interpolated between the ``(t_s, level)`` points (held flat past the ends)."""
        ts, levels = zip(*self.points, strict=True)
        return np.interp(t, ts, levels)

    def _knots(self, duration_s: float) -> tuple[np.ndarray, np.ndarray]:
        ts = np.array([t for t, _ in self.points if t < duration_s] + [duration_s])
        return ts, self.shape(ts, duration_s)

    def shape_mean(self, duration_s: float) -> float:
        """Mean of the piecewise-linear rate over the point (trapezoids); ValueError if it is 0 throughout."""
        ts, levels = self._knots(duration_s)
        if len(ts) == 1:
            return float(levels[0])
        mean = float(np.sum((levels[1:] + levels[:-1]) / 2 * np.diff(ts)) / duration_s)
        if mean <= 0:
            raise ValueError(f"the piecewise rate is 0 throughout the point's {duration_s:g} s: no request to send")
        return mean

    def shape_max(self, duration_s: float) -> float:
        """The highest level the piecewise rate reaches within the point."""
        return float(self._knots(duration_s)[1].max())


class TraceArrivals(BaseModel):
    """Replay of a request trace: arrival times and token counts both come from the trace.

    Two ways to reach the sweep's ``rate_rps`` (the mean rate over the point):

    - time scaling (default, ``speedup`` unset): the trace's clock runs faster or slower so that its mean rate
      becomes ``rate_rps``; every request of the window is sent, bursts keep their shape, compressed in time;
    - rate scaling (``speedup`` set): the trace's clock runs at ``speedup`` (1: real time) and requests of
      the window are sampled (seeded) down to ``rate_rps``; the time structure keeps its own scale.

    ``start_s`` picks the window in the trace's own time; ``duration_s`` of the workload bounds it; ``sample``
    thins the trace further (a seeded fraction of requests) before the rate is matched.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    kind: Literal["trace"] = "trace"
    path: str = Field(
        description="Trace path (Azure or BurstGPT CSV, Mooncake JSONL) or a shipped trace, e.g. azure_conv_2023."
    )
    start_s: float = Field(default=0.0, ge=0, description="Where the window starts, in the trace's own time.")
    speedup: float | None = Field(
        default=None, gt=0, le=10_000,
        description="Fixed time scaling (2: twice as fast); the rate is then matched by sampling requests.",
    )
    sample: float = Field(default=1.0, gt=0, le=1, description="Fraction of requests kept (seeded).")
    skip_bad_rows: bool = Field(default=False, description="Skip malformed rows (counted) instead of failing.")


class ClosedLoopArrivals(BaseModel):
    """A fixed number of users, each sending its next request when its last one ends (plus a think time).

    The sweep's ``concurrency`` values are the numbers of users; the request rate is whatever the server sustains.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    kind: Literal["closed"] = "closed"
    think_time_s: float = Field(default=0.0, ge=0, le=3600, description="Pause between a response and the next.")


Arrival = Annotated[
    PoissonArrivals | ConstantArrivals | GammaArrivals | RampArrivals | DiurnalArrivals | PiecewiseArrivals
    | TraceArrivals | ClosedLoopArrivals,
    Field(discriminator="kind"),
]


class FixedLength(BaseModel):
    """Every request has the same token length, ``value``."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    kind: Literal["fixed"] = "fixed"
    value: int = Field(gt=0)

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``n`` copies of ``value``."""
        return np.full(n, self.value, dtype=np.int64)


class UniformLength(BaseModel):
    """Token lengths uniform over the integers ``[low, high]``."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    kind: Literal["uniform"] = "uniform"
    low: int = Field(gt=0)
    high: int = Field(gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> UniformLength:
        if self.high < self.low:
            raise ValueError(f"high ({self.high}) must be >= low ({self.low})")
        return self

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``n`` integers drawn uniformly from ``[low, high]`` (both included)."""
        return rng.integers(self.low, self.high + 1, size=n)


class LogNormalLength(BaseModel):
    """Log-normal with the given median and log-space sigma, clipped to [min, max]."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    kind: Literal["lognormal"] = "lognormal"
    median: float = Field(gt=0)
    sigma: float = Field(ge=0, le=4)
    min: int = Field(default=1, gt=0)
    max: int = Field(default=1_000_000, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> LogNormalLength:
        if self.max < self.min:
            raise ValueError(f"max ({self.max}) must be >= min ({self.min})")
        return self

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``n`` log-normal lengths, rounded to integers and clipped to ``[min, max]``."""
        x = rng.lognormal(np.log(self.median), self.sigma, size=n)
        return np.clip(np.rint(x), self.min, self.max).astype(np.int64)


class TraceLength(BaseModel):
    """Token counts drawn (seeded, with replacement) from a column of a request trace (Azure or BurstGPT
    CSV, Mooncake JSONL): the trace's empirical distribution, clipped to [min, max]."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    kind: Literal["trace"] = "trace"
    path: str = Field(
        description="Trace path (Azure or BurstGPT CSV, Mooncake JSONL) or a shipped trace, e.g. azure_conv_2023."
    )
    column: Literal["prompt", "output"] | None = Field(
        default=None, description="Which token counts; default: prompt for prompt_tokens, output for output_tokens."
    )
    min: int = Field(default=1, gt=0)
    max: int | None = Field(default=None, gt=0, description="Clip (e.g. to fit the model's context length).")
    skip_bad_rows: bool = Field(default=False, description="Skip malformed rows (counted) instead of failing.")

    @model_validator(mode="after")
    def _ordered(self) -> TraceLength:
        if self.max is not None and self.max < self.min:
            raise ValueError(f"max ({self.max}) must be >= min ({self.min})")
        return self

    def values(self) -> np.ndarray:
        """The trace's token counts of the chosen column (prompt or output), loaded once and cached."""
        from workloads.traces import load_trace_cached

        if self.column is None:
            raise ValueError("trace lengths need a column (prompt or output)")
        trace = load_trace_cached(self.path, self.skip_bad_rows)
        return trace.prompt_tokens if self.column == "prompt" else trace.output_tokens

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``n`` token counts resampled with replacement from the trace, clipped to ``[min, max]``."""
        x = rng.choice(self.values(), size=n, replace=True)
        return np.clip(x, self.min, self.max if self.max is not None else None).astype(np.int64)


LengthDistribution = Annotated[
    FixedLength | UniformLength | LogNormalLength | TraceLength, Field(discriminator="kind")
]


class LengthStream:
    """Prompt and output lengths drawn on demand (closed loop: how many requests is not known in advance)."""

    def __init__(self, prompt: LengthSampler, output: LengthSampler, seed: int, block: int = 256) -> None:
        seeds = np.random.SeedSequence(seed).spawn(2)
        self._rngs = (np.random.default_rng(seeds[0]), np.random.default_rng(seeds[1]))
        self._dists = (prompt, output)
        self._block = block
        self._queue: list[tuple[int, int]] = []

    def next(self) -> tuple[int, int]:
        """The next request's (prompt tokens, output tokens), drawn in blocks from the two seeded streams."""
        if not self._queue:
            p = self._dists[0].sample(self._rngs[0], self._block).tolist()
            o = self._dists[1].sample(self._rngs[1], self._block).tolist()
            self._queue = [(int(a), int(b)) for a, b in zip(p, o, strict=True)][::-1]
        return self._queue.pop()


def build_requests(
    arrival: ArrivalProcess,
    prompt: Callable[[np.random.Generator, int], np.ndarray],
    output: Callable[[np.random.Generator, int], np.ndarray],
    rate_rps: float,
    duration_s: float,
    seed: int,
) -> list[RequestSpec]:
    """Arrival times and lengths from independent seeded streams (changing one leaves the others as they were)."""
    seeds = np.random.SeedSequence(seed).spawn(3)
    times = list(arrival.times(np.random.default_rng(seeds[0]), rate_rps, duration_s))
    p = prompt(np.random.default_rng(seeds[1]), len(times))
    o = output(np.random.default_rng(seeds[2]), len(times))
    return [RequestSpec(float(t), int(a), int(b)) for t, a, b in zip(times, p, o, strict=True)]


def build_trace_requests(spec: TraceArrivals, rate_rps: float, duration_s: float, seed: int) -> list[RequestSpec]:
    """The trace window replayed at ``rate_rps`` on average for ``duration_s`` seconds (time or rate scaling)."""
    from workloads.traces import TraceError, load_trace_cached, replay_window

    trace = load_trace_cached(spec.path, skip_bad_rows=spec.skip_bad_rows)
    if spec.speedup is None:
        speedup = rate_rps / (trace.mean_rate_rps * spec.sample)
        window = replay_window(trace, start_s=spec.start_s, duration_s=duration_s * speedup, speedup=speedup,
                               sample=spec.sample, seed=seed)
    else:
        span = duration_s * spec.speedup
        in_window = int(np.count_nonzero((trace.t_s >= spec.start_s) & (trace.t_s < spec.start_s + span)))
        available = in_window * spec.sample / duration_s
        if available < rate_rps:
            raise TraceError(
                f"{trace.source}: the window at {spec.start_s:g} s holds {available:.3g} requests/s at speedup "
                f"{spec.speedup:g} (sample {spec.sample:g}), fewer than the {rate_rps:g} requests/s asked for: "
                "raise speedup, or drop it to time-scale the trace instead"
            )
        window = replay_window(trace, start_s=spec.start_s, duration_s=span, speedup=spec.speedup,
                               sample=spec.sample * rate_rps / available, seed=seed)
    return [
        RequestSpec(float(t), int(p), int(o))
        for t, p, o in zip(window.t_s, window.prompt_tokens, window.output_tokens, strict=True)
    ]
