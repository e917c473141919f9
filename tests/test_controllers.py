import asyncio

import pytest

from controllers.loop import ControlLoop
from controllers.policies import Decision, Observation, build_policy
from serving.slo import SLO
from serving.types import AppliedKnobs, Knobs

CLOCKS = (510.0, 810.0, 1110.0, 1410.0, 1710.0, 1980.0)
TARGETS = SLO(ttft_s=1.0, tpot_s=0.1)


def obs(t: float = 0.0, ttft: float | None = 0.2, tpot: float | None = 0.02) -> Observation:
    return Observation(t, 5.0, ttft, tpot, 10, 300.0, None, 3, 0, 1980.0, 256, CLOCKS)


class StepClock:
    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return self.t

    async def sleep(self, s: float) -> None:
        self.t += s
        await asyncio.sleep(0)


class RecordingActuator:
    def __init__(self, fail_on: int | None = None) -> None:
        self.applied: list[Knobs] = []
        self.restored = 0
        self.heartbeats = 0

    async def apply(self, knobs: Knobs) -> list[AppliedKnobs]:
        self.applied.append(knobs)
        return [AppliedKnobs(knobs.clock_mhz, knobs.max_num_seqs or 256, 0.0)]

    async def restore_defaults(self) -> None:
        self.restored += 1

    async def heartbeat(self, lease_s: float) -> None:
        self.heartbeats += 1


def test_slo_feedback_lowers_clock_with_headroom_and_jumps_up_at_risk() -> None:
    p = build_policy("slo_feedback", TARGETS)
    clocks = [p.decide(obs(tpot=0.02)).knobs.clock_mhz for _ in range(8)]
    assert clocks[-1] < clocks[0] and clocks == sorted(clocks, reverse=True)
    assert min(clocks) in CLOCKS
    risky = p.decide(obs(tpot=0.099))
    assert risky.reason == "slo_risk" and risky.knobs.clock_mhz == max(CLOCKS)


def test_slo_feedback_holds_without_data_and_settles_near_setpoint() -> None:
    p = build_policy("slo_feedback", TARGETS, setpoint=0.7)
    first = p.decide(obs(ttft=None, tpot=None))
    assert first.reason == "no_data" and first.knobs.clock_mhz == max(CLOCKS)
    # Latency inversely proportional to clock: the loop should settle where pressure ~ setpoint.
    clock = max(CLOCKS)
    for _ in range(60):
        tpot = 0.1 * 0.7 * (1110.0 / clock)  # at 1110 MHz pressure is exactly 0.7
        clock = p.decide(obs(tpot=tpot)).knobs.clock_mhz
    assert clock in (1110.0, 1410.0)


def test_unknown_policy_lists_known() -> None:
    with pytest.raises(ValueError, match=r"unknown policy 'magic'; known: .*slo_feedback"):
        build_policy("magic", TARGETS)


class Flip:
    """A policy chasing an oscillating load: wants a different clock every period."""

    name = "flip"

    def __init__(self) -> None:
        self.i = 0

    def decide(self, o: Observation) -> Decision:
        self.i += 1
        return Decision(Knobs(clock_mhz=CLOCKS[self.i % 2]), "flip")


async def test_oscillating_load_is_rate_limited() -> None:
    clock, act = StepClock(), RecordingActuator()

    async def observe() -> Observation:
        return obs(t=clock.t)

    loop = ControlLoop(Flip(), observe, act, clock, period_s=1.0, max_changes_per_min=6)
    for _ in range(180):  # three minutes of one-second periods
        await loop.step()
        await clock.sleep(1.0)
    assert len(act.applied) <= 3 * 6 + 1
    assert loop.stats.decisions[("flip", "rate_limited")] > 60  # every other wish equals the current clock
    assert act.heartbeats == 180


async def test_defaults_restored_on_cancel_and_on_policy_failure() -> None:
    clock, act = StepClock(), RecordingActuator()

    async def observe() -> Observation:
        return obs(t=clock.t)

    loop = ControlLoop(build_policy("slo_feedback", TARGETS), observe, act, clock)
    task = asyncio.create_task(loop.run())
    for _ in range(5):
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert act.restored == 1



class FailsSometimes:
    """Wants a lower clock every period, but fails on the periods in ``failing`` (a corrupt model file, a bug)."""

    name = "sometimes"

    def __init__(self, failing: set[int]) -> None:
        self.failing = failing
        self.calls = 0

    def decide(self, o: Observation) -> Decision:
        self.calls += 1
        if self.calls in self.failing:
            raise RuntimeError("model file corrupt")
        return Decision(Knobs(clock_mhz=CLOCKS[-1 - self.calls % 3]), "down")


async def test_a_failing_step_restores_defaults_is_counted_and_the_loop_goes_on() -> None:
    clock, act = StepClock(), RecordingActuator()

    async def observe() -> Observation:
        return obs(t=clock.t)

    policy = FailsSometimes({3, 4})
    loop = ControlLoop(policy, observe, act, clock, period_s=1.0)
    task = asyncio.create_task(loop.run())
    while policy.calls < 8:
        await asyncio.sleep(0)
    assert loop.running and not task.done()
    assert loop.stats.errors == {"decide": 2} and loop.stats.decisions[("sometimes", "error")] == 2
    assert "model file corrupt" in (loop.stats.last_error or "")
    assert act.restored == 1  # after the first failure (knobs had been changed); the second found the defaults
    times = [r.t_s for r in loop.stats.history]
    assert len(times) >= 5 and max(times) >= 7.0  # decisions go on after the failures, one period apart
    assert loop.current != Knobs()  # and apply again
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert act.restored == 2 and not loop.running


async def test_an_actuator_that_fails_is_counted_under_apply_and_the_loop_goes_on() -> None:
    clock = StepClock()

    class Hung(RecordingActuator):
        async def apply(self, knobs: Knobs) -> list[AppliedKnobs]:
            if len(self.applied) < 2:
                self.applied.append(knobs)
                raise TimeoutError("replica-0 did not confirm the knobs in 30 s")
            return await super().apply(knobs)

    act = Hung()

    async def observe() -> Observation:
        return obs(t=clock.t)

    policy = FailsSometimes(set())
    loop = ControlLoop(policy, observe, act, clock, period_s=1.0)
    task = asyncio.create_task(loop.run())
    while policy.calls < 5:
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert loop.stats.errors == {"apply": 2} and act.restored == 3  # two failures, then the exit
    assert len(act.applied) >= 3  # a decision after the failures was applied


def plant(clock: float, rate: float = 5.0) -> tuple[float, float]:
    """A toy serving stack: TPOT grows as the clock falls; energy per token is lowest at a middle clock."""
    tpot = 0.03 * (1980.0 / clock)
    energy = 0.5 + 0.4 * ((clock - 1110.0) / 870.0) ** 2
    return tpot, energy


def plant_obs(clock: float, t: float, rate: float = 5.0) -> Observation:
    tpot, energy = plant(clock, rate)
    return Observation(t, rate, 0.2, tpot, 10, 300.0, energy, 3, 0, clock, 256, CLOCKS)


def test_model_based_online_finds_the_cheapest_clock_meeting_the_slo() -> None:
    p = build_policy("model_based", TARGETS, dwell=3, hold=50)
    clock = max(CLOCKS)
    reasons = []
    for t in range(60):
        d = p.decide(plant_obs(clock, float(t)))
        clock = d.knobs.clock_mhz or clock
        reasons.append(d.reason)
    assert "profiling" in reasons and "cheapest_meeting_slo" in reasons
    assert clock == 1110.0  # the energy minimum; its TPOT (0.054 s) is within 85% of the 0.1 s SLO
    # Profiling never went below a clock that broke the margin: 510 MHz would give TPOT 0.116 s.
    assert reasons[-1] == "hold"


def test_model_based_stops_walking_down_at_the_slo() -> None:
    tight = SLO(ttft_s=1.0, tpot_s=0.06)  # 1110 MHz (0.054 s) is over 85% of it; 1410 MHz is not
    p = build_policy("model_based", tight, dwell=2, hold=50)
    clock, seen = max(CLOCKS), set()
    for t in range(40):
        clock = p.decide(plant_obs(clock, float(t))).knobs.clock_mhz or clock
        seen.add(clock)
    assert clock == 1410.0 and min(seen) >= 1110.0


def test_model_based_from_a_knob_sweep(tmp_path) -> None:
    rows = ["setting,offered_rps,energy_per_token_j,ttft_p99_s,tpot_p99_s"]
    for c in (810, 1410, 1980):
        tpot, energy = plant(c)
        rows += [f"clock_mhz={c},2,{energy},0.3,{tpot}", f"clock_mhz={c},8,{energy * 0.6},0.5,{tpot * 1.7}"]
    rows.append("policy=slo_feedback,2,0.1,0.1,0.01")  # policy rows are not operating points
    path = tmp_path / "points.csv"
    path.write_text("\n".join(rows) + "\n")
    slo = SLO(ttft_s=1.0, tpot_s=0.08)  # 85% margin: TPOT <= 0.068 s
    p = build_policy("model_based", slo, profile=str(path))
    # At 1.5/s the 2/s curve applies: 810 MHz breaks the margin (0.073 s), 1410 MHz is cheaper than 1980.
    assert p.decide(plant_obs(1980, 0, rate=1.5)).knobs.clock_mhz == 1410
    # At 7/s the 8/s curve applies: 1410 MHz now breaks the margin (0.072 s), so only 1980 MHz is left.
    at8 = p.decide(plant_obs(1980, 1, rate=7.0))
    assert at8.knobs.clock_mhz == 1980 and at8.reason == "cheapest_meeting_slo"
    with pytest.raises(ValueError, match="not found"):
        build_policy("model_based", TARGETS, profile=str(tmp_path / "missing.csv"))


def test_controller_config_rejects_bad_policy_options(tmp_path) -> None:
    from pydantic import ValidationError

    from controllers.config import ControllerConfig

    with pytest.raises(ValidationError, match="does not take these options"):
        ControllerConfig(policy="slo_feedback", options={"gain": 3})
    with pytest.raises(ValidationError, match="not found"):
        ControllerConfig(policy="model_based", options={"profile": str(tmp_path / "none.csv")})


def test_speculation_on_at_low_load_off_at_high_load_or_low_acceptance() -> None:
    import dataclasses

    p = build_policy("slo_feedback", TARGETS, spec_k=4, spec_max_running=8)
    low = p.decide(obs())  # 3 running
    assert low.knobs.speculative_tokens == 4
    high = p.decide(dataclasses.replace(obs(), running=20))
    assert high.knobs.speculative_tokens == 0 and high.reason == "spec_off_high_load"
    poor = p.decide(dataclasses.replace(obs(), spec_acceptance=0.05))
    assert poor.knobs.speculative_tokens == 0 and poor.reason == "spec_low_acceptance"
    assert build_policy("slo_feedback", TARGETS).decide(obs()).knobs.speculative_tokens is None  # left alone


def test_model_based_profile_keeps_switches_and_integer_knobs(tmp_path) -> None:
    """A sweep row pinning the prefix cache off is its own operating point (not merged into the row with it on),
    and counts stay integers."""
    from controllers.model_based import load_profile

    path = tmp_path / "points.csv"
    path.write_text("setting,offered_rps,energy_per_token_j,ttft_p99_s,tpot_p99_s\n"
                    "max_num_seqs=8 prefix_caching=off,2,0.5,0.3,0.02\n"
                    "max_num_seqs=8 prefix_caching=on,2,0.4,0.2,0.02\n")
    off, on = (p.knobs for p in load_profile(path))
    assert off == Knobs(max_num_seqs=8, prefix_caching=False) and on == Knobs(max_num_seqs=8, prefix_caching=True)
    assert isinstance(off.max_num_seqs, int)


class _StuckActor:
    """A replica whose knob change never confirms (an engine restart that outlasts the actuator's patience)."""

    class _Method:
        def remote(self, *args: object) -> object:
            return asyncio.sleep(30)

    apply = restore_defaults = _Method()

    class _Telemetry:
        async def _now(self) -> object:
            from serving.replica import Telemetry
            from serving.types import EngineStats

            return Telemetry(EngineStats("replica-7", "emulated", 0, 0, 0, 0, 0.0, 0.0, 0.0, 0, 0, 1, 8), [], [])

        def remote(self) -> object:
            return self._now()

    telemetry = _Telemetry()


async def test_a_knob_change_that_never_confirms_names_the_replica_and_is_a_504() -> None:
    import httpx

    from controllers.actuators import KnobApplyError, ReplicaActuator
    from controllers.config import ControllerConfig
    from controllers.service import Controller, add_control_routes
    from profilers.footprint import load_site_profile
    from serving.api import FrontDoor, create_app
    from serving.router import ReplicaHandle, Router

    router = Router([ReplicaHandle("replica-7", _StuckActor())])
    with pytest.raises(KnobApplyError, match=r"replica replica-7 did not finish apply within 0.2 s"):
        await ReplicaActuator(router, restart_timeout_s=0.2).apply(Knobs(max_num_seqs=4))
    door = FrontDoor(router, "m", 1024, load_site_profile("azure"))
    controller = Controller(ControllerConfig(token="t"), door)
    controller.actuator.restart_timeout_s = 0.2  # type: ignore[union-attr]
    app = create_app(door)
    add_control_routes(app, controller)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://door") as client:
        r = await client.post("/control/knobs", json={"max_num_seqs": 4}, headers={"authorization": "Bearer t"})
    assert r.status_code == 504 and r.json()["error"]["code"] == "knob_apply_timeout"
    assert "replica-7" in r.json()["error"]["message"] and "restart_timeout_s" in r.json()["error"]["message"]


async def test_an_operators_step_during_a_slow_periodic_step_runs_after_it() -> None:
    """A forced step (POST /control/knobs) while a periodic step's knobs are still being applied (an engine restart)
    waits for it: the applies never overlap, and the operator's knobs are the ones in force afterwards."""
    clock = StepClock()
    applying = 0
    overlaps: list[int] = []

    class SlowActuator(RecordingActuator):
        async def apply(self, knobs: Knobs) -> list[AppliedKnobs]:
            nonlocal applying
            applying += 1
            overlaps.append(applying)
            await asyncio.sleep(0.05)
            applying -= 1
            return await super().apply(knobs)

    async def observe() -> Observation:
        return obs(t=clock.t)

    act = SlowActuator()
    loop = ControlLoop(build_policy("static", TARGETS, max_num_seqs=64), observe, act, clock)
    periodic = asyncio.create_task(loop.step())
    await asyncio.sleep(0.01)  # the periodic step is applying max_num_seqs=64 now
    loop.set_policy(build_policy("static", TARGETS, max_num_seqs=8))
    forced = await loop.step(force=True)
    await periodic
    assert max(overlaps) == 1
    assert [k.max_num_seqs for k in act.applied] == [64, 8] and forced.changed
    assert loop.current.max_num_seqs == 8
