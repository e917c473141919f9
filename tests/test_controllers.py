import asyncio

import pytest

from controllers.loop import ControlLoop
from controllers.policies import Decision, Observation, SLOTargets, build_policy
from serving.types import AppliedKnobs, Knobs

CLOCKS = (510.0, 810.0, 1110.0, 1410.0, 1710.0, 1980.0)
SLO = SLOTargets(ttft_s=1.0, tpot_s=0.1)


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
    p = build_policy("slo_feedback", SLO)
    clocks = [p.decide(obs(tpot=0.02)).knobs.clock_mhz for _ in range(8)]
    assert clocks[-1] < clocks[0] and clocks == sorted(clocks, reverse=True)
    assert min(clocks) in CLOCKS
    risky = p.decide(obs(tpot=0.099))
    assert risky.reason == "slo_risk" and risky.knobs.clock_mhz == max(CLOCKS)


def test_slo_feedback_holds_without_data_and_settles_near_setpoint() -> None:
    p = build_policy("slo_feedback", SLO, setpoint=0.7)
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
        build_policy("magic", SLO)


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

    loop = ControlLoop(build_policy("slo_feedback", SLO), observe, act, clock)
    task = asyncio.create_task(loop.run())
    for _ in range(5):
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert act.restored == 1

    class Broken:
        name = "broken"

        def decide(self, o: Observation) -> Decision:
            raise RuntimeError("model file corrupt")

    loop = ControlLoop(Broken(), observe, act, clock)
    with pytest.raises(RuntimeError, match="corrupt"):
        await loop.run()
    assert act.restored == 2 and loop.stats.decisions[("broken", "error")] == 1
