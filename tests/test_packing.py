"""The batch cap in the router (packing the load onto few replicas) and the policies that plan all three knobs."""

import dataclasses

import pytest

from controllers.actuators import EngineActuator
from controllers.policies import Observation, build_policy
from serving.config import EmulatedEngineConfig
from serving.emulated.engine import EmulatedEngine
from serving.router import ReplicaHandle, Router
from serving.slo import SLO
from serving.types import Knobs

CLOCKS = (510.0, 810.0, 1110.0, 1410.0, 1710.0, 1980.0)
TARGETS = SLO(ttft_s=1.0, tpot_s=0.1)


def obs(t: float = 0.0, tpot: float | None = 0.02, waiting: int = 0, rate: float = 5.0,
        energy: float | None = None, running: int = 3) -> Observation:
    return Observation(t, rate, 0.2, tpot, 10, 300.0, energy, running, waiting, 1980.0, 256, CLOCKS)


def router(n: int = 3) -> Router:
    return Router([ReplicaHandle(f"r{i}", actor=None) for i in range(n)])


def test_packing_fills_the_busiest_replica_with_room_then_spills() -> None:
    r = router()
    r.replicas[1].outstanding = 1
    assert r.pick().name == "r0"  # spreading (default): the least outstanding
    r.pack_per_replica = 3
    assert r.pick().name == "r1"  # packing: the busiest with room
    r.replicas[1].outstanding = 3
    assert r.pick().name == "r0"  # r1 is full: the next fills up (ties go to the first listed)
    r.replicas[0].outstanding = 2
    assert r.pick().name == "r0"  # r0 drains r2's share rather than waking r2
    for h in r.replicas:
        h.outstanding = 3
    r.replicas[2].outstanding = 4
    assert r.pick().name == "r0"  # every replica full: the least loaded
    assert r.pick(exclude={"r0"}).name == "r1"  # a retry still avoids the replica that failed


async def test_engine_actuator_sets_and_restores_router_packing() -> None:
    engines = [EmulatedEngine(EmulatedEngineConfig(model="qwen2.5-0.5b"), f"r{i}") for i in range(2)]
    r = Router([ReplicaHandle(e.replica, actor=None) for e in engines])
    act = EngineActuator(engines, r)
    await act.apply(Knobs(clock_mhz=810, pack_per_replica=16))
    assert r.pack_per_replica == 16 and engines[0].clock_mhz == 810
    await act.apply(Knobs(clock_mhz=960))  # a knob left as None keeps the packing
    assert r.pack_per_replica == 16
    with pytest.raises(ValueError, match=r"knob pack_per_replica: must be an integer in \[0, 4096\]"):
        Knobs(pack_per_replica=-1)
    await act.restore_defaults()
    assert r.pack_per_replica == 0 and engines[1].clock_mhz == 1980.0


def test_slo_feedback_packs_with_headroom_and_spreads_on_pressure_or_a_queue() -> None:
    p = build_policy("slo_feedback", TARGETS, batch_cap=24)
    assert p.decide(obs()).knobs.pack_per_replica == 24
    spread = p.decide(obs(waiting=9))  # a queue is the early sign of overload
    assert spread.knobs.pack_per_replica == 0 and spread.reason == "spread_slo_risk"
    # Spread for the hold (30 periods), then packing is retried...
    held = [p.decide(obs(t=float(t))).knobs.pack_per_replica for t in range(30)]
    assert held == [0] * 30 and p.decide(obs()).knobs.pack_per_replica == 24
    # ...and failing again soon doubles the hold.
    assert p.decide(obs(tpot=0.08)).knobs.pack_per_replica == 0  # pressure 0.8 > setpoint 0.7
    held = [p.decide(obs()).knobs.pack_per_replica for _ in range(60)]
    assert held == [0] * 60 and p.decide(obs()).knobs.pack_per_replica == 24
    # Without the option the policy leaves routing alone.
    assert build_policy("slo_feedback", TARGETS).decide(obs()).knobs.pack_per_replica is None


def plant(k: Knobs, rate: float = 5.0) -> tuple[float, float]:
    """A toy stack: packing and speculation cut energy; packing also costs latency, more at low clocks."""
    clock = k.clock_mhz or 1980.0
    tpot = 0.03 * (1980.0 / clock) ** 0.5 * (1.6 if k.pack_per_replica else 1.0) * rate / 5.0
    energy = 0.5 + 0.4 * ((clock - 1110.0) / 870.0) ** 2
    energy *= (0.6 if k.pack_per_replica else 1.0) * (0.85 if k.speculative_tokens else 1.0)
    return tpot, energy


def drive(p, periods: int, rate: float = 5.0, start: float = 0.0) -> tuple[Knobs, list[str], set[Knobs]]:  # type: ignore[no-untyped-def]
    current, reasons, seen = Knobs(clock_mhz=1980.0), [], set()
    for t in range(periods):
        tpot, energy = plant(current, rate)
        d = p.decide(obs(t=start + t, tpot=tpot, rate=rate, energy=energy))
        current = current.model_copy(update=d.knobs.model_dump(exclude_none=True))
        reasons.append(d.reason)
        seen.add(current)
    return current, reasons, seen


def test_model_based_plans_clock_packing_and_speculation_together() -> None:
    p = build_policy("model_based", TARGETS, dwell=2, hold=0, batch_cap=32, spec_k=4)
    chosen, reasons, seen = drive(p, 80)
    assert "profiling" in reasons and reasons[-1] == "hold"
    # Packed with speculation at 1110 MHz: TPOT there is 0.03 x 1.34 x 1.6 = 0.064 s, within 85% of the SLO,
    # and the energy minimum of the clock curve; 810 MHz packed (0.075 s) is feasible but dearer.
    assert chosen == Knobs(clock_mhz=1110.0, pack_per_replica=32, speculative_tokens=4)
    # Packed at 510 MHz (0.095 s) broke the margin: it was tried once, for no more than its dwell.
    assert Knobs(clock_mhz=510.0, pack_per_replica=32, speculative_tokens=4) in seen


def test_model_based_replans_when_the_load_moves_and_reuses_known_plans() -> None:
    p = build_policy("model_based", TARGETS, dwell=2, hold=0, batch_cap=32, spec_k=4)
    low, _, _ = drive(p, 80, rate=5.0)
    # At twice the load, packing pushes TPOT over the margin at every clock: it plans spread.
    high, reasons, _ = drive(p, 80, rate=10.0, start=80)
    assert "profiling" in reasons and high.pack_per_replica == 0
    # Back at the first load: the plan made for it, with no profiling.
    again, reasons, _ = drive(p, 5, rate=5.0, start=160)
    assert "profiling" not in reasons and "replan_known_load" in reasons
    assert again.pack_per_replica == low.pack_per_replica == 32 and again.clock_mhz == low.clock_mhz
    # A new load between the two: the heavier load's plan still meets the SLO there, so no profiling either.
    between, reasons, _ = drive(p, 5, rate=7.5, start=165)
    assert "profiling" not in reasons and "replan_heavier_load_plan" in reasons and between == high


def test_model_based_from_a_sweep_with_every_knob(tmp_path) -> None:
    rows = ["setting,offered_rps,energy_per_token_j,ttft_p99_s,tpot_p99_s"]
    for c in (810, 1110, 1980):
        for pack in (0, 32):
            for k in (0, 4):
                for rate in (4, 8):
                    tpot, energy = plant(Knobs(clock_mhz=c, pack_per_replica=pack, speculative_tokens=k), rate)
                    rows.append(f"clock_mhz={c} speculative_tokens={k} pack_per_replica={pack},{rate},{energy},"
                                f"0.3,{tpot}")
    path = tmp_path / "points.csv"
    path.write_text("\n".join(rows) + "\n")
    p = build_policy("model_based", TARGETS, profile=str(path))
    at4 = p.decide(obs(rate=3.5))
    assert at4.knobs == Knobs(clock_mhz=1110.0, speculative_tokens=4, pack_per_replica=32)
    at8 = p.decide(obs(rate=7.0))  # at 8/s packing fits only at 1980 MHz, dearer than spreading at 1110 MHz
    assert at8.knobs.pack_per_replica == 0 and at8.knobs.speculative_tokens == 4
    # Just below the 4/s bin's rate the 8/s plan is kept (hysteresis); clearly below it, back to the 4/s plan.
    assert p.decide(obs(rate=3.9)).knobs.pack_per_replica == 0
    assert p.decide(obs(rate=2.0)).knobs.pack_per_replica == 32
    # Latency at the SLO: the load is heavier than its rate says, so the next bin's plan.
    assert p.decide(obs(rate=2.0, tpot=0.12)).knobs.pack_per_replica == 0


async def test_an_oscillating_load_moves_the_knobs_no_more_than_the_limit() -> None:
    """Real policies (clock + packing + speculation) against a load swinging between idle and overload."""
    import asyncio

    from controllers.loop import ControlLoop
    from serving.types import AppliedKnobs

    class Clock:
        t = 0.0

        def now(self) -> float:
            return self.t

        async def sleep(self, s: float) -> None:
            self.t += s
            await asyncio.sleep(0)

    class Recorder:
        def __init__(self) -> None:
            self.applied: list[tuple[float, Knobs]] = []

        async def apply(self, knobs: Knobs) -> list[AppliedKnobs]:
            self.applied.append((clock.t, knobs))
            return [AppliedKnobs(knobs.clock_mhz, 256, 0.0)]

        async def restore_defaults(self) -> None: ...

        async def heartbeat(self, lease_s: float) -> None: ...

    clock = Clock()

    async def observe() -> Observation:
        busy = int(clock.t) // 7 % 2 == 1  # 7 s calm, 7 s overloaded, ...
        return obs(t=clock.t, tpot=0.12 if busy else 0.01, waiting=20 if busy else 0,
                   rate=12.0 if busy else 2.0, running=40 if busy else 2, energy=0.3)

    for policy in (build_policy("slo_feedback", TARGETS, batch_cap=16, spec_k=4),
                   build_policy("model_based", TARGETS, dwell=2, hold=0, batch_cap=16, spec_k=4)):
        clock.t, act = 0.0, Recorder()

        loop = ControlLoop(policy, observe, act, clock, period_s=1.0, max_changes_per_min=6)
        for _ in range(300):  # five minutes
            await loop.step()
            await clock.sleep(1.0)
        times = [t for t, _ in act.applied]
        assert len(times) > 6  # the knobs did move...
        for t0 in times:  # ...but never more than 6 times in any 60 s
            assert sum(1 for t in times if t0 <= t < t0 + 60) <= 6, (policy.name, t0)
        assert loop.stats.decisions.get((policy.name, "rate_limited"), 0) > 0


def test_trial_energy_is_a_ratio_of_sums_so_quiet_periods_do_not_dominate() -> None:
    from controllers.model_based import _Trial

    quiet_then_busy = _Trial(Knobs(clock_mhz=510.0), 0, energy=[5.0, 0.3], tokens=[10.0, 1000.0])
    steady = _Trial(Knobs(clock_mhz=1980.0), 0, energy=[0.5, 0.5], tokens=[1000.0, 1000.0])
    assert quiet_then_busy.per_token() == pytest.approx((50.0 + 300.0) / 1010.0)
    assert quiet_then_busy.per_token() < steady.per_token()  # a mean of per-period ratios would say 2.65 > 0.5
    assert _Trial(Knobs(), 0, energy=[1.0, 3.0]).per_token() == 2.0  # no token counts: the plain mean


async def test_observer_reports_the_tokens_its_energy_per_token_divides_by() -> None:
    from controllers.observe import Observer
    from serving.api import RecentRequests
    from serving.replica import Telemetry

    engine = EmulatedEngine(EmulatedEngineConfig(model="qwen2.5-0.5b"), "r0")
    state = {"tokens": 0, "energy": 0.0}

    async def telemetry() -> list[Telemetry]:
        stats = dataclasses.replace(engine.stats(), generated_tokens_total=state["tokens"])
        reading = dataclasses.replace(engine.read()[0], energy_j=state["energy"])
        return [Telemetry(stats, engine.devices(), [reading], tuple(engine.supported_clocks_mhz()))]

    observe = Observer(RecentRequests(), telemetry, lambda: 0.0)
    first = await observe()
    assert first.tokens is None and first.energy_per_token_j is None  # nothing to difference yet
    state.update(tokens=100, energy=30.0)
    second = await observe()
    assert second.tokens == 100 and second.energy_per_token_j == pytest.approx(0.3)
