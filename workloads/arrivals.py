"""Arrival processes (seeded, registered by ``kind``) and the request specs they produce."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, Literal, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator


@dataclass(frozen=True)
class RequestSpec:
    t_s: float
    """Intended send time, seconds from the start of the point."""
    prompt_tokens: int
    max_output_tokens: int


class LengthSampler(Protocol):
    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray: ...


class ArrivalProcess(Protocol):
    def times(self, rng: np.random.Generator, rate_rps: float, duration_s: float) -> Iterator[float]: ...


class PoissonArrivals(BaseModel):
    """Exponential inter-arrival times (memoryless open-loop traffic)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["poisson"] = "poisson"

    def times(self, rng: np.random.Generator, rate_rps: float, duration_s: float) -> Iterator[float]:
        t = 0.0
        while True:
            t += rng.exponential(1.0 / rate_rps)
            if t >= duration_s:
                return
            yield t


class ConstantArrivals(BaseModel):
    """Evenly spaced requests (the first at t=0)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["constant"] = "constant"

    def times(self, rng: np.random.Generator, rate_rps: float, duration_s: float) -> Iterator[float]:
        n = int(np.floor(duration_s * rate_rps - 1e-9)) + 1
        for i in range(n):
            yield i / rate_rps


class GammaArrivals(BaseModel):
    """Gamma inter-arrival times with coefficient of variation ``cv`` (1 = Poisson, > 1 = bursty)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["gamma"] = "gamma"
    cv: float = Field(default=2.0, gt=0, le=20, description="Burstiness: std/mean of inter-arrival gaps.")

    def times(self, rng: np.random.Generator, rate_rps: float, duration_s: float) -> Iterator[float]:
        shape = 1.0 / self.cv**2
        scale = 1.0 / (rate_rps * shape)
        t = 0.0
        while True:
            t += rng.gamma(shape, scale)
            if t >= duration_s:
                return
            yield t


class TraceArrivals(BaseModel):
    """Replay of a request trace: arrival times and token counts both come from the trace.

    The sweep's ``rate_rps`` time-scales the trace to that mean rate; ``duration_s`` bounds the replayed window.
    """

    model_config = ConfigDict(extra="forbid")
    kind: Literal["trace"] = "trace"
    path: str = Field(description="CSV path (Azure or BurstGPT format) or a shipped trace, e.g. azure_conv_2023.")
    start_s: float = Field(default=0.0, ge=0, description="Where the window starts, in the trace's own time.")
    sample: float = Field(default=1.0, gt=0, le=1, description="Fraction of requests kept (seeded).")
    skip_bad_rows: bool = Field(default=False, description="Skip malformed rows (counted) instead of failing.")


class ClosedLoopArrivals(BaseModel):
    """A fixed number of users, each sending its next request when its last one ends (plus a think time).

    The sweep's ``concurrency`` values are the numbers of users; the request rate is whatever the server sustains.
    """

    model_config = ConfigDict(extra="forbid")
    kind: Literal["closed"] = "closed"
    think_time_s: float = Field(default=0.0, ge=0, le=3600, description="Pause between a response and the next.")


Arrival = Annotated[
    PoissonArrivals | ConstantArrivals | GammaArrivals | TraceArrivals | ClosedLoopArrivals,
    Field(discriminator="kind"),
]


class FixedLength(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["fixed"] = "fixed"
    value: int = Field(gt=0)

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return np.full(n, self.value, dtype=np.int64)


class UniformLength(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["uniform"] = "uniform"
    low: int = Field(gt=0)
    high: int = Field(gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> UniformLength:
        if self.high < self.low:
            raise ValueError(f"high ({self.high}) must be >= low ({self.low})")
        return self

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.integers(self.low, self.high + 1, size=n)


class LogNormalLength(BaseModel):
    """Log-normal with the given median and log-space sigma, clipped to [min, max]."""

    model_config = ConfigDict(extra="forbid")
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
        x = rng.lognormal(np.log(self.median), self.sigma, size=n)
        return np.clip(np.rint(x), self.min, self.max).astype(np.int64)


LengthDistribution = Annotated[FixedLength | UniformLength | LogNormalLength, Field(discriminator="kind")]


class LengthStream:
    """Prompt and output lengths drawn on demand (closed loop: how many requests is not known in advance)."""

    def __init__(self, prompt: LengthSampler, output: LengthSampler, seed: int, block: int = 256) -> None:
        seeds = np.random.SeedSequence(seed).spawn(2)
        self._rngs = (np.random.default_rng(seeds[0]), np.random.default_rng(seeds[1]))
        self._dists = (prompt, output)
        self._block = block
        self._queue: list[tuple[int, int]] = []

    def next(self) -> tuple[int, int]:
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
    """The trace window replayed at ``rate_rps`` on average for ``duration_s`` seconds."""
    from workloads.traces import load_trace, replay_window

    trace = load_trace(spec.path, skip_bad_rows=spec.skip_bad_rows)
    speedup = rate_rps / trace.mean_rate_rps
    window = replay_window(
        trace, start_s=spec.start_s, duration_s=duration_s * speedup, speedup=speedup, sample=spec.sample, seed=seed
    )
    return [
        RequestSpec(float(t), int(p), int(o))
        for t, p, o in zip(window.t_s, window.prompt_tokens, window.output_tokens, strict=True)
    ]
