"""Emulated GPUs against measured serving: replay ML.ENERGY Benchmark v3 configurations in virtual time.

Each measured row is one (model, task, GPU, tensor parallelism, vLLM ``max_num_seqs``) configuration served
closed-loop at steady state: ``max_num_seqs`` users, each sending its next request when the last one
finishes, energy from the GPUs' own counters over the steady-state window (``calibration/README.md``).
:func:`replay_row` does the same on the emulated engine in virtual time; :func:`mean_field` is its fast
aggregate (the steady-state batch priced directly), used to fit a preset's constants (:func:`fit_preset`).
"""

from __future__ import annotations

import asyncio
import csv
import math
import random
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from deploy.virtual import VirtualClock
from profilers.errors import ConfigError
from serving.config import EmulatedEngineConfig
from serving.emulated.devices import DeviceSpec, device_from_dict
from serving.emulated.engine import EmulatedEngine
from serving.emulated.physics import ModelShape, load_model_shape, work_cost
from serving.emulated.shapes import WorkCounts, count_rows
from serving.types import GenerationRequest

DATASET = "mlenergy_v3.csv"
DATASET_NAME = "ML.ENERGY Benchmark v3"

GPU_PRESETS = {"H100": "h100_sxm", "B200": "b200"}
"""The emulated preset of each measured GPU model."""

MODEL_SHAPES = {
    "meta-llama/Llama-3.1-8B-Instruct": "llama-3.1-8b",
    "meta-llama/Llama-3.1-70B-Instruct": "llama-3.1-70b",
    "meta-llama/Llama-3.1-405B-Instruct-FP8": "llama-3.1-405b-fp8",
    "Qwen/Qwen3-30B-A3B-Instruct-2507": "qwen3-30b-a3b",
}
"""Shipped shapes (``serving/emulated/models``) of the measured models; others come from a config folder."""

TASK_PROMPT_TOKENS = {"lm-arena-chat": 300, "gpqa": 250, "sourcegraph-fim": 1500}
"""Mean prompt tokens per task (chat template applied). The dataset does not publish them: lm-arena-chat's
is inferred from the rows where the KV cache, not ``max_num_seqs``, capped the batch (capacity / batch -
output / 2 gives 300-400 on H100 and B200, three models); the other two are estimates from the tasks'
shape (a multiple-choice question; a code file around a gap). A row's ``avg_input_len`` column wins."""

OUTPUT_SIGMA = 0.8
"""Spread (log-normal sigma) of prompt and output lengths around their means: chat outputs range from a
line to pages. It sets the mean context of a running sequence (length-biased: P + O·e^(σ²)/2)."""


class CalibrationDataError(ConfigError):
    """A measurements file or row that cannot be replayed; names the file, the line and the field."""


@dataclass(frozen=True)
class MeasuredRow:
    """One measured configuration (a row of the dataset)."""

    line: int
    model_id: str
    task: str
    gpu: str
    num_gpus: int
    tensor_parallel: int
    data_parallel: int
    max_num_seqs: int
    avg_batch_size: float
    avg_output_len: float
    avg_input_len: float | None
    power_w: float
    j_per_token: float
    throughput: float
    median_itl_s: float

    @property
    def devices_per_replica(self) -> int:
        """GPUs one engine spans. Expert parallelism (Qwen3-MoE on 2 GPUs is tp=1, ep=2) is emulated as
        tensor parallelism: both split the weights and exchange activations every layer."""
        return max(1, self.num_gpus // self.data_parallel)

    @property
    def prompt_tokens(self) -> float:
        """Mean prompt length in tokens: the row's own, else the typical one of its task."""
        return self.avg_input_len or TASK_PROMPT_TOKENS.get(self.task, TASK_PROMPT_TOKENS["lm-arena-chat"])

    @property
    def label(self) -> str:
        """Short row label for tables: model, GPU x count, max_num_seqs."""
        return f"{self.model_id.split('/')[-1]} {self.gpu}x{self.num_gpus} seqs={self.max_num_seqs}"


@dataclass(frozen=True)
class Figures:
    """Steady-state figures of a configuration, measured or emulated (all GPUs of the configuration)."""

    j_per_token: float
    power_w: float
    throughput: float
    median_itl_s: float
    avg_batch: float = math.nan


METRICS = ("j_per_token", "power_w", "throughput", "median_itl_s")


def dataset_path() -> Path:
    return Path(str(resources.files("serving.emulated") / "calibration" / DATASET))


def load_measurements(path: str | Path | None = None) -> list[MeasuredRow]:
    """Rows of a measurements CSV in the dataset's columns (the shipped ML.ENERGY v3 file by default)."""
    path = Path(path) if path else dataset_path()
    try:
        text = path.read_text()
    except OSError as e:
        raise CalibrationDataError(f"{path}: cannot read the measurements: {e.strerror}") from e
    reader = csv.DictReader(text.splitlines())
    rows = []
    for line, rec in enumerate(reader, start=2):
        rows.append(_row(path, line, rec))
    if not rows:
        raise CalibrationDataError(f"{path}: no measured rows")
    return rows


def _row(path: Path, line: int, rec: dict[str, str]) -> MeasuredRow:
    def num(field: str, cast: Callable[[str], Any] = float, optional: bool = False) -> Any:
        raw = rec.get(field)
        if raw in (None, ""):
            if optional:
                return None
            raise CalibrationDataError(f"{path} line {line}: field {field!r} is missing")
        try:
            value = cast(float(raw)) if cast is int else cast(raw)
        except ValueError:
            raise CalibrationDataError(f"{path} line {line}: field {field!r}: {raw!r} is not a number") from None
        if not math.isfinite(value) or value <= 0:
            raise CalibrationDataError(f"{path} line {line}: field {field!r}: {raw!r} must be positive")
        return value

    return MeasuredRow(
        line=line,
        model_id=rec.get("model_id") or "",
        task=rec.get("task") or "",
        gpu=rec.get("gpu_model") or "",
        num_gpus=num("num_gpus", int),
        tensor_parallel=num("tensor_parallel", int),
        data_parallel=num("data_parallel", int, optional=True) or 1,
        max_num_seqs=num("max_num_seqs", int),
        avg_batch_size=num("avg_batch_size"),
        avg_output_len=num("avg_output_len"),
        avg_input_len=num("avg_input_len", optional=True),
        power_w=num("avg_power_watts"),
        j_per_token=num("energy_per_token_joules"),
        throughput=num("output_throughput_tokens_per_sec"),
        median_itl_s=num("median_itl_ms") / 1e3,
    )


def measured(row: MeasuredRow) -> Figures:
    """The row's measured figures (J/token, W, tokens/s, median ITL, batch size) to compare the emulation against."""
    return Figures(row.j_per_token, row.power_w, row.throughput, row.median_itl_s, row.avg_batch_size)


def model_for(row: MeasuredRow, config_dir: Path | None = None) -> ModelShape:
    """The row's model shape: shipped, or ``config_dir/<org>/<name>/config.json`` / ``config_dir/<name>.json``."""
    if row.model_id in MODEL_SHAPES:
        return load_model_shape(MODEL_SHAPES[row.model_id])
    if config_dir is not None:
        name = row.model_id.split("/")[-1]
        for candidate in (config_dir / row.model_id / "config.json", config_dir / f"{name}.json"):
            if candidate.exists():
                return load_model_shape(str(candidate))
    raise CalibrationDataError(
        f"line {row.line}: no model shape for {row.model_id!r}: shipped ones are {sorted(MODEL_SHAPES)}; "
        "give its HF config.json under --model-configs DIR (DIR/<org>/<name>/config.json or DIR/<name>.json)"
    )


def preset_for(row: MeasuredRow) -> str:
    """The emulated device preset of the row's GPU; CalibrationDataError if there is none."""
    try:
        return GPU_PRESETS[row.gpu]
    except KeyError:
        raise CalibrationDataError(
            f"line {row.line}: no emulated preset for GPU {row.gpu!r} (have {sorted(GPU_PRESETS)})"
        ) from None


# --- the fast aggregate ---------------------------------------------------------------------------
def mean_field(row: MeasuredRow, device: DeviceSpec, model: ModelShape, clock_mhz: float | None = None) -> Figures:
    """Steady state priced directly: the measured average batch decoding at the mean running context, with
    Poisson-many new prompts prefilled per step (one request finishes, and one starts, every O/B steps). The
    batch is capped by the sequences of that context the device's KV cache holds, as on the engine (which
    preempts beyond it), so the fit sees the batch the replay runs."""
    tp = row.devices_per_replica
    clock = clock_mhz or device.f_max_mhz
    prompt, out = row.prompt_tokens, row.avg_output_len
    ctx = prompt + out * math.exp(OUTPUT_SIGMA**2) / 2
    batch = min(row.avg_batch_size, device.kv_capacity_tokens(model, tp) / ctx)
    # One decode at the mean running context and one whole prompt, counted by the engine's own formula.
    decode, prefill = count_rows(model.work_constants, [(1, ctx), (prompt, 0)])
    arrivals = batch / out
    times, energies, probs = [], [], []
    k, p_k = 0, math.exp(-arrivals)
    while k == 0 or (sum(probs) < 0.999 and k < 200):
        counts = [batch * d + k * p for d, p in zip(decode, prefill, strict=True)]
        work = WorkCounts(round(batch + k * prompt), *counts)
        t, e, _ = work_cost(device, model, work, round(batch) + k, clock, tp)
        times.append(t)
        energies.append(e)
        probs.append(p_k)
        k += 1
        p_k *= arrivals / k
    w = np.array(probs) / sum(probs)
    mean_t, mean_e = float(w @ np.array(times)), float(w @ np.array(energies))
    median_t = times[int(np.searchsorted(np.cumsum(w), 0.5))]
    dp = row.data_parallel
    return Figures(mean_e / batch, dp * mean_e / mean_t, dp * batch / mean_t, median_t, batch)


# --- the engine in virtual time ------------------------------------------------------------------
def _lognormal(rng: random.Random, mean: float, cap: int) -> int:
    mu = math.log(mean) - OUTPUT_SIGMA**2 / 2
    return max(1, min(cap, round(rng.lognormvariate(mu, OUTPUT_SIGMA))))


def replay_row(
    row: MeasuredRow,
    device: DeviceSpec,
    model: ModelShape,
    seed: int = 0,
    warmup_requests: float = 1.5,
    window_requests: float = 2.0,
) -> Figures:
    """Serve ``row``'s configuration on the emulated engine in virtual time as ML.ENERGY measured it:
    ``max_num_seqs`` closed-loop users, lengths drawn around the row's means, figures over a steady-state
    window (after ``warmup_requests`` x users completions, lasting ``window_requests`` x users more)."""
    clock = VirtualClock()
    return clock.execute(_replay(row, device, model, clock, seed, warmup_requests, window_requests))


async def _replay(
    row: MeasuredRow, device: DeviceSpec, model: ModelShape, clock: VirtualClock, seed: int,
    warmup_requests: float, window_requests: float,
) -> Figures:
    users = row.max_num_seqs
    max_len = 16384
    config = EmulatedEngineConfig(
        device="calibration", model=model.name, max_model_len=max_len, max_num_seqs=users,
        tensor_parallel=row.devices_per_replica, stream_interval_s=0, seed=seed,
    )
    engine = EmulatedEngine(config, "calibration", clock=clock, device=device, model=model)
    engine.stream_every_token = False
    last_token: dict[str, float] = {}
    itls: list[float] = []
    window: dict[str, float] = {}

    def on_token(rid: str, t: float) -> None:
        prev = last_token.get(rid)
        if prev is not None and "start" in window and "end" not in window:
            itls.append(t - prev)
        last_token[rid] = t

    engine.on_token = on_token
    completed = 0
    warm, stop = int(warmup_requests * users), int((warmup_requests + window_requests) * users)
    done = asyncio.Event()
    snapshots: dict[str, tuple[float, float, int, int]] = {}

    def snap(name: str) -> None:
        stats, reading = engine.stats(), engine.read()
        energy = sum(r.energy_j for r in reading)
        snapshots[name] = (clock.now(), energy, stats.generated_tokens_total, stats.iterations)
        window[name] = clock.now()

    async def user(u: int) -> None:
        nonlocal completed
        rng = random.Random(f"{seed}:{u}")
        i = 0
        while not done.is_set():
            prompt = _lognormal(rng, row.prompt_tokens, max_len // 2)
            out = _lognormal(rng, row.avg_output_len, max_len - prompt - 1)
            rid = f"u{u}-{i}"
            request = GenerationRequest(rid, prompt_token_ids=[0] * prompt, max_tokens=out, ignore_eos=True)
            async for _ in engine.generate(request):
                pass
            last_token.pop(rid, None)
            i += 1
            completed += 1
            if completed == warm:
                snap("start")
            elif completed == stop:
                snap("end")
                done.set()

    await engine.start()
    tasks = [asyncio.create_task(user(u)) for u in range(users)]
    await done.wait()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await engine.stop()
    (t0, e0, n0, i0), (t1, e1, n1, i1) = snapshots["start"], snapshots["end"]
    dt, tokens, dp = t1 - t0, n1 - n0, row.data_parallel
    return Figures(
        j_per_token=(e1 - e0) / tokens,
        power_w=dp * (e1 - e0) / dt,
        throughput=dp * tokens / dt,
        median_itl_s=statistics.median(itls) if itls else math.nan,
        avg_batch=tokens / max(1, i1 - i0),
    )


# --- errors and fitting --------------------------------------------------------------------------
def relative_errors(emulated: Figures, truth: Figures) -> dict[str, float]:
    """(emulated - measured) / measured per metric."""
    return {m: getattr(emulated, m) / getattr(truth, m) - 1 for m in METRICS}


@dataclass(frozen=True)
class FitParameter:
    """A preset constant the fit may move: its dotted path in the preset and its physical bounds."""

    path: str
    low: float
    high: float
    unset: float | None = None
    """The value a preset without the field has (None: ``low``)."""
    optional: bool = False
    """A term a preset may leave out (its default turns it off): fitted only for presets that set it, so a preset
    without it is fitted, and cross-validated, on the terms it uses."""


FIT_PARAMETERS = (
    FitParameter("memory.efficiency", 0.5, 0.95),
    FitParameter("compute_efficiency", 0.3, 0.8),  # cuBLAS reaches ~70-80% of peak in large GEMMs
    FitParameter("attention_efficiency", 0.15, 1.0),
    FitParameter("overhead_s", 1e-5, 5e-3),
    FitParameter("layer_overhead_s", 1e-7, 2e-4),
    FitParameter("moe_layer_overhead_s", 1e-8, 2e-4),
    FitParameter("dtype_compute_efficiency.fp8", 0.3, 1.0, unset=1.0),
    FitParameter("sequence_overhead_s", 1e-8, 1e-4),
    FitParameter("overlapped_overhead_s", 1e-7, 2e-2, optional=True),
    FitParameter("overlapped_sequence_s", 1e-8, 2e-4, optional=True),
    FitParameter("gemm_overlap", 0.0, 1.0, unset=1.0, optional=True),
    FitParameter("interconnect.allreduce_latency_s", 1e-7, 5e-5),
    FitParameter("memory.energy_pj_per_byte", 31.0, 400.0),  # HBM alone is ~3.9 pJ/bit (O'Connor 2017)
    FitParameter("compute_energy_scale", 1.0, 40.0),
    FitParameter("busy_power_w", 0.0, 1.0),  # as a share of the span from idle power to TDP
)


def _value(data: dict[str, Any], path: str) -> Any:
    head, _, leaf = path.rpartition(".")
    return (data.get(head) or {} if head else data).get(leaf)


def fit_parameters(data: dict[str, Any]) -> tuple[FitParameter, ...]:
    """The FIT_PARAMETERS a preset's fit moves: all but the optional terms the preset does not set."""
    return tuple(p for p in FIT_PARAMETERS if not p.optional or _value(data, p.path) is not None)


def _with(data: dict[str, Any], values: Sequence[float]) -> dict[str, Any]:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for p, v in zip(fit_parameters(data), values, strict=True):
        if p.path == "busy_power_w":
            v = data["idle_power_w"] + v * (data["tdp_w"] - data["idle_power_w"]) * 0.999
        head, _, leaf = p.path.rpartition(".")
        (out.setdefault(head, {}) if head else out)[leaf] = float(v)
    return out


def preset_data(name: str) -> dict[str, Any]:
    import yaml

    return yaml.safe_load((resources.files("serving.emulated") / "presets" / f"{name}.yaml").read_text())


HUBER_LOG_ERROR = 0.1
"""Log errors up to this count squared in the fit's loss, larger ones linearly (Huber): a row no smooth physics
can follow (Llama-3.1-8B on B200 at 128 sequences steps 3x slower than at 64, and draws less power) is not let
pull every constant towards it."""


def score(device: DeviceSpec, rows: Iterable[tuple[MeasuredRow, ModelShape]]) -> float:
    """Mean Huber loss of the log errors of J/token, power, throughput and median ITL (squared below
    ``HUBER_LOG_ERROR``, linear above)."""
    d = HUBER_LOG_ERROR
    errs = []
    for row, model in rows:
        em, tr = mean_field(row, device, model), measured(row)
        for m in METRICS:
            x = abs(math.log(getattr(em, m) / getattr(tr, m)))
            errs.append(x * x if x <= d else d * (2 * x - d))
    return float(np.mean(errs))


def fit_preset(
    data: dict[str, Any], rows: list[tuple[MeasuredRow, ModelShape]], iterations: int = 3000, seed: int = 0
) -> tuple[dict[str, Any], float]:
    """Fit (Nelder-Mead over bounded parameters, :func:`score` of the log errors) of a preset's
    :func:`fit_parameters` to measured rows through :func:`mean_field`; returns the fitted preset data and its
    score."""
    params = fit_parameters(data)
    lows = np.array([p.low for p in params])
    highs = np.array([p.high for p in params])

    def unpack(z: np.ndarray) -> np.ndarray:
        return lows + (highs - lows) / (1 + np.exp(-z))

    def loss(z: np.ndarray) -> float:
        try:
            return score(device_from_dict(_with(data, unpack(z))), rows)
        except ValueError:
            return 1e9

    start = []
    for p in params:
        v = _value(data, p.path)
        if v is None:
            v = p.low if p.unset is None else p.unset
        if p.path == "busy_power_w":
            v = (data["busy_power_w"] - data["idle_power_w"]) / (data["tdp_w"] - data["idle_power_w"])
        frac = min(0.99, max(0.01, (float(v) - p.low) / (p.high - p.low)))
        start.append(math.log(frac / (1 - frac)))
    z = _nelder_mead(loss, np.array(start), iterations, random.Random(seed))
    best = _with(data, unpack(z))
    return best, score(device_from_dict(best), rows)


def _nelder_mead(f: Callable[[np.ndarray], float], x0: np.ndarray, iterations: int, rng: random.Random) -> np.ndarray:
    n = len(x0)
    simplex = [x0] + [x0 + np.eye(n)[i] * (0.5 + rng.random()) for i in range(n)]
    values = [f(x) for x in simplex]
    for _ in range(iterations):
        order = np.argsort(values)
        simplex, values = [simplex[i] for i in order], [values[i] for i in order]
        centroid = np.mean(simplex[:-1], axis=0)
        worst = simplex[-1]
        reflected = centroid + (centroid - worst)
        fr = f(reflected)
        if fr < values[0]:
            expanded = centroid + 2 * (centroid - worst)
            fe = f(expanded)
            simplex[-1], values[-1] = (expanded, fe) if fe < fr else (reflected, fr)
        elif fr < values[-2]:
            simplex[-1], values[-1] = reflected, fr
        else:
            contracted = centroid + 0.5 * (worst - centroid)
            fc = f(contracted)
            if fc < values[-1]:
                simplex[-1], values[-1] = contracted, fc
            else:  # shrink towards the best
                simplex = [simplex[0]] + [simplex[0] + 0.5 * (x - simplex[0]) for x in simplex[1:]]
                values = [values[0]] + [f(x) for x in simplex[1:]]
    return simplex[int(np.argmin(values))]


def rows_for(gpu: str, rows: list[MeasuredRow], config_dir: Path | None = None) -> list[tuple[MeasuredRow, ModelShape]]:
    return [(r, model_for(r, config_dir)) for r in rows if r.gpu == gpu]


__all__ = [
    "CalibrationDataError",
    "Figures",
    "MeasuredRow",
    "fit_preset",
    "load_measurements",
    "mean_field",
    "measured",
    "model_for",
    "preset_for",
    "relative_errors",
    "replay_row",
]
