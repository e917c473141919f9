"""Routing around dead replicas with real Ray actors."""

import asyncio

import pytest
import ray

from deploy.serve import start_deployment
from serving.config import EmulatedEngineConfig, ServingConfig
from serving.router import NoReplicaError, ReplicaFailedError
from serving.types import GenerationRequest

pytestmark = pytest.mark.slow


def cfg(replicas: int = 2) -> ServingConfig:
    return ServingConfig(replicas=replicas, engine=EmulatedEngineConfig(model="qwen2.5-0.5b", max_model_len=1024))


async def run(router, rid: str, tokens: int = 5) -> int:
    n = 0
    async for ev in router.stream(GenerationRequest(rid, prompt="a b c", max_tokens=tokens)):
        n += len(ev.token_ids)
    return n


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie serves nothing
    except (FileNotFoundError, ProcessLookupError):
        return False


async def _dead(actor, pid: int, timeout_s: float = 30.0) -> None:
    """Until Ray reports the actor dead and its process has exited: Ray marks a killed actor dead before the
    process is gone, and until then the process still serves its channel socket."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while asyncio.get_running_loop().time() < deadline:
        try:
            await actor.describe.remote()
        except ray.exceptions.ActorDiedError:
            if not _running(pid):
                return
        except ray.exceptions.ActorUnavailableError:
            pass
        await asyncio.sleep(0.1)
    raise AssertionError("the killed actor still answers or its process still runs")


async def test_requests_spread_and_survive_a_killed_replica(ray_local) -> None:
    dep = await start_deployment(cfg())
    try:
        router = dep.router
        assert await asyncio.gather(*(run(router, f"a{i}") for i in range(4))) == [5] * 4
        assert {r.routed for r in router.replicas} == {2}  # light load still spreads over both
        victim = router.replicas[0]
        pid = next(i["pid"] for i in dep.replica_info if i["replica"] == victim.name)
        ray.kill(victim.actor, no_restart=True)
        await _dead(victim.actor, pid)  # ray.kill returns before the process is gone; a request meanwhile may be served
        # The router learns of the death on the next request it sends there and retries on the other replica.
        results = await asyncio.gather(*(run(router, f"b{i}") for i in range(6)))
        assert results == [5] * 6
        assert not victim.alive and router.replicas[1].alive
        snap = await router.snapshot()
        assert {d.replica for d in snap.devices} == {"replica-1"}
    finally:
        await dep.stop()


async def test_death_mid_stream_is_reported_not_hidden(ray_local) -> None:
    dep = await start_deployment(cfg(replicas=1))
    try:
        router = dep.router
        stream = router.stream(GenerationRequest("long", prompt="a b", max_tokens=1000))
        first = await anext(stream)
        assert first.token_ids
        ray.kill(router.replicas[0].actor, no_restart=True)
        with pytest.raises(ReplicaFailedError, match="died after streaming part of the response"):
            async for _ in stream:
                pass
        with pytest.raises(NoReplicaError, match="no live replica"):
            await run(router, "after")
    finally:
        await dep.stop()


def test_outbox_ships_one_event_per_request_and_keeps_errors() -> None:
    from serving.replica import StreamError, _Outbox
    from serving.types import TokenEvent

    box = _Outbox()
    for i in range(3):  # a reader that fell behind: three events of request a, one of b
        box.put(TokenEvent("a", "r", "x", [i], i, output_tokens=i + 1))
    box.put(TokenEvent("b", "r", "y", [7], 0, output_tokens=1))
    box.put(StreamError("b", RuntimeError("engine failed")))
    batch = box.drain()
    assert [(type(i).__name__, i.request_id) for i in batch] == [
        ("TokenEvent", "a"), ("TokenEvent", "b"), ("StreamError", "b")
    ]
    assert batch[0].token_ids == [0, 1, 2] and batch[0].text == "xxx" and batch[0].output_tokens == 3
    assert not box.items and box.drain() == []


class _SlowSocket:
    """A stream writer whose peer stops reading: frames pile up in its buffer until ``caught_up`` is set."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.buffered = 0
        self.caught_up = asyncio.Event()
        self.transport = self

    def is_closing(self) -> bool:
        return False

    def write(self, data: bytes) -> None:
        self.frames.append(data)
        self.buffered += len(data)

    def get_write_buffer_size(self) -> int:
        return self.buffered

    async def drain(self) -> None:
        await self.caught_up.wait()
        self.buffered = 0


async def test_socket_channel_ships_one_frame_per_loop_turn_and_merges_while_the_reader_lags() -> None:
    import pickle

    from serving.replica import _ChannelFlush, _Outbox
    from serving.types import TokenEvent

    box, sock = _Outbox(), _SlowSocket()
    flush = _ChannelFlush(box, sock)  # type: ignore[arg-type]
    flush.HIGH_WATER = 1  # the first frame fills the buffer
    box.on_ready = flush.schedule
    for rid in "ab":  # one engine iteration: two requests' events in one frame
        box.put(TokenEvent(rid, "r", "x", [0], 0, output_tokens=1))
    await asyncio.sleep(0)
    assert len(sock.frames) == 1
    assert [e.request_id for e in pickle.loads(sock.frames[0][4:])] == ["a", "b"]
    for i in range(1, 4):  # three more iterations while the reader lags: nothing is written, nothing is lost
        box.put(TokenEvent("a", "r", "y", [i], i, output_tokens=i + 1))
        await asyncio.sleep(0)
    assert len(sock.frames) == 1
    sock.caught_up.set()
    for _ in range(3):
        await asyncio.sleep(0)
    assert len(sock.frames) == 2
    (merged,) = pickle.loads(sock.frames[1][4:])
    assert merged.token_ids == [1, 2, 3] and merged.text == "yyy" and merged.output_tokens == 4
    flush.stop()


async def _socket_batches(actor, channel: str):  # type: ignore[no-untyped-def]
    import pickle

    from serving.replica import channel_proof

    host, port, secret = await actor.stream_address.remote()
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"{secret} {channel} n0nce\n".encode())
    assert (await reader.readline()).strip() == channel_proof(secret, channel, "n0nce")  # the replica proves it too
    try:
        while True:
            size = int.from_bytes(await reader.readexactly(4), "big")
            yield pickle.loads(await reader.readexactly(size))
    finally:
        writer.close()


async def test_channel_ships_an_iteration_of_many_requests_in_one_message(ray_local) -> None:
    dep = await start_deployment(cfg(replicas=1))
    try:
        actor = dep.router.replicas[0].actor
        channel = "test-channel"
        batches = _socket_batches(actor, channel)
        reading = asyncio.ensure_future(anext(batches))  # connect first: events submitted before would wait
        await asyncio.gather(*(
            actor.submit.remote(GenerationRequest(f"c{i}", prompt="a b c", max_tokens=20), channel) for i in range(8)
        ))
        tokens: dict[str, int] = {}
        sizes = []
        finished: set[str] = set()

        def take(batch) -> None:  # type: ignore[no-untyped-def]
            sizes.append(len(batch))
            for ev in batch:
                tokens[ev.request_id] = tokens.get(ev.request_id, 0) + len(ev.token_ids)
                if ev.finished:
                    finished.add(ev.request_id)

        take(await reading)
        async for batch in batches:
            take(batch)
            if len(finished) == 8:
                break
        await batches.aclose()
        assert tokens == {f"c{i}": 20 for i in range(8)}
        assert max(sizes) > 1  # requests decoded in the same iteration travel together
        assert len(sizes) < 8 * 20  # far fewer messages than tokens
        # A request the engine rejects fails at submit, with the engine's own message.
        with pytest.raises(ray.exceptions.RayTaskError, match="maximum context length"):
            await actor.submit.remote(GenerationRequest("big", prompt="a", max_tokens=5000), channel)
        # Without the secret (handed out through Ray only) the replica closes the connection, reading nothing.
        host, port, _ = await actor.stream_address.remote()
        assert host == "127.0.0.1"  # a local cluster's channels listen on loopback only
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"not-the-secret some-channel n0nce\n")
        assert await asyncio.wait_for(reader.read(), 30) == b""
        writer.close()
    finally:
        await dep.stop()


async def test_rejected_request_over_the_socket_is_the_engines_error(ray_local) -> None:
    from serving.types import RequestRejectedError

    dep = await start_deployment(cfg(replicas=1))
    try:
        with pytest.raises(RequestRejectedError, match="maximum context length"):
            await run(dep.router, "too-big", 5000)
        assert dep.router.replicas[0].alive and await run(dep.router, "fine", 4) == 4
    finally:
        await dep.stop()


async def test_abandoned_stream_is_cancelled_in_the_engine(ray_local) -> None:
    dep = await start_deployment(cfg(replicas=1))
    try:
        router = dep.router
        stream = router.stream(GenerationRequest("gone", prompt="a b", max_tokens=1000))
        await anext(stream)
        await stream.aclose()  # the client went away after one chunk
        actor = router.replicas[0].actor
        for _ in range(100):
            tel = await actor.telemetry.remote()
            if tel.stats.running == 0:
                break
            await asyncio.sleep(0.1)
        assert tel.stats.running == 0 and tel.stats.generated_tokens_total < 1000
        assert await run(router, "next", 7) == 7  # the channel still serves the next request
    finally:
        await dep.stop()


async def test_abandoned_stream_to_a_replica_in_this_process_is_cancelled_in_the_engine() -> None:
    """A front door hosted by the replica (``ReplicaHandle.local``): a client that goes away must free the engine's
    slot at once, as over the channel, not whenever the abandoned generator is collected."""
    from serving.replica import Replica
    from serving.router import ReplicaHandle, Router

    replica = Replica("host", cfg().engine.model_dump())
    await replica.engine.start()
    held = []  # a reference elsewhere (a traceback, a log record) keeps a generator from being collected
    generate = replica.generate

    def generate_and_hold(request: GenerationRequest):  # type: ignore[no-untyped-def]
        held.append(stream := generate(request))
        return stream

    replica.generate = generate_and_hold  # type: ignore[method-assign]
    try:
        router = Router([ReplicaHandle("host", object(), local=replica)])
        stream = router.stream(GenerationRequest("gone", prompt="a b", max_tokens=1000))
        await anext(stream)
        await stream.aclose()  # the client went away after one chunk
        for _ in range(50):
            if replica.engine.stats().running == 0:
                break
            await asyncio.sleep(0.02)
        assert replica.engine.stats().running == 0 and replica.engine.stats().generated_tokens_total < 1000
        assert await run(router, "next", 7) == 7
    finally:
        await replica.engine.stop()


def test_engine_stats_become_the_exporters_replica_sample_field_for_field() -> None:
    from dataclasses import fields

    from profilers.exporter import ReplicaSample
    from serving.types import EngineStats

    stats = EngineStats("engine-name", "vllm", *range(1, 16))
    sample = stats.export_sample("replica-3")
    assert sample.replica == "replica-3" and sample.backend == "vllm"
    assert (sample.prompt_tokens, sample.generated_tokens) == (stats.prompt_tokens_total, stats.generated_tokens_total)
    for f in fields(ReplicaSample):
        if f.name != "replica" and hasattr(stats, f.name):
            assert getattr(sample, f.name) == getattr(stats, f.name), f.name
    # A field the exporter adds must be reported by the engines (``up`` is the router's: heartbeats).
    assert all(hasattr(stats, f.name) or f.name in ("prompt_tokens", "generated_tokens", "replica", "up")
               for f in fields(ReplicaSample))


async def test_router_unpickles_nothing_from_a_peer_that_cannot_prove_the_secret() -> None:
    """A process that took the replica's port (or sits in the path) must prove the channel secret first."""
    import pickle

    from serving.router import Channel

    sent: list[bytes] = []

    async def impostor(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        frame = pickle.dumps([("would be unpickled",)])
        writer.write(b"0" * 64 + b"\n" + len(frame).to_bytes(4, "big") + frame)
        sent.append(frame)
        await writer.drain()
        await asyncio.sleep(1)
        writer.close()

    server = await asyncio.start_server(impostor, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]

    class _Address:  # the replica's stream_address, as the channel calls it
        async def remote(self) -> tuple[str, int, str]:
            return "127.0.0.1", port, "the-secret"

    class _Actor:
        stream_address = _Address()

        class describe:
            @staticmethod
            async def remote() -> None:
                return None

    channel = Channel(_Actor())
    queue = channel.open("r1")
    item = await asyncio.wait_for(queue.get(), 30)
    assert sent and "did not prove the replica's channel secret" in str(item.error)
    await channel.stop()
    server.close()
