"""The AsyncClient used natively (asyncio): async with, awaited calls, async iterators
for streams, concurrency on one loop, and agreement with the sync Client.

(The parity and error suites also run against the AsyncClient through the synchronous
adapter in tests/asyncadapter.py; these tests cover what only asyncio code can do.)
"""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
import torch

from normserve.client import AsyncClient, Client, LayerInfo, NormalizeResult
from normserve.client import errors as E

pytestmark = pytest.mark.e2e

TIMEOUT = 30


def batch(seed: int, shape=(6, 3)) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.5, 2.0, shape).astype(np.float32)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


def test_async_with_and_every_method(server, name):
    async def main():
        async with AsyncClient(server.target, timeout=TIMEOUT) as c:
            assert await c.ready() and await c.health() == "SERVING"
            info = await c.create_layer(name, "BatchNorm1d", num_features=3, momentum=None)
            assert isinstance(info, LayerInfo) and info.kind == "BatchNorm1d"
            assert (await c.get_layer(name)) == info
            assert [i.name for i in await c.list_layers(name)] == [name]
            r = await c.normalize_result(name, batch(0), "train")
            assert isinstance(r, NormalizeResult) and r.state.version == 1 and len(r.request_id) == 32
            out = await c.normalize(name, torch.from_numpy(batch(1)), "eval")
            assert isinstance(out, torch.Tensor)
            state = await c.get_state(name)
            assert set(state) == {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
            v = await c.load_state(name, state, expected_version=1)
            assert v.version == 2
            with pytest.raises(E.AbortedError):
                await c.reset_running_stats(name, expected_version=1)
            assert (await c.reset_running_stats(name)).num_batches_tracked == 0
            imported = await c.import_state(name + "-imp", torch.nn.BatchNorm1d(3).state_dict(), kind="BatchNorm1d")
            assert imported.args["num_features"] == 3
            await c.delete_layer(name)
            await c.delete_layer(name + "-imp")
            with pytest.raises(E.NotFoundError):
                await c.get_layer(name)
        assert "AsyncClient" in repr(c)

    run(main())


def test_async_streams_take_sync_and_async_iterables(server, name):
    xs = [batch(i) for i in range(5)]

    async def agen():
        for x in xs:
            await asyncio.sleep(0)
            yield x

    async def main():
        async with AsyncClient(server.target, timeout=TIMEOUT) as c:
            await c.create_layer(name, "BatchNorm1d", num_features=3, momentum=None)
            results = [r async for r in c.normalize_stream_results(name, agen(), "train", timeout=TIMEOUT)]
            assert [r.state.num_batches_tracked for r in results] == [1, 2, 3, 4, 5]
            outs = [o async for o in c.normalize_stream(name, xs, "eval", timeout=TIMEOUT)]
            assert len(outs) == 5 and all(isinstance(o, np.ndarray) for o in outs)
            torch_outs = [o async for o in c.normalize_stream(name, [torch.from_numpy(x) for x in xs], "eval")]
            assert all(isinstance(o, torch.Tensor) for o in torch_outs)
            return results, outs

    results, outs = run(main())
    local = torch.nn.BatchNorm1d(3, momentum=None)
    for r, x in zip(results, xs):
        torch.testing.assert_close(torch.from_numpy(r.output), local(torch.from_numpy(x)).detach(), rtol=1e-5, atol=1e-5)
    local.eval()
    for o, x in zip(outs, xs):
        torch.testing.assert_close(torch.from_numpy(o), local(torch.from_numpy(x)).detach(), rtol=1e-5, atol=1e-5)


def test_async_stream_errors(server, name):
    async def main():
        async with AsyncClient(server.target, timeout=TIMEOUT) as c:
            await c.create_layer(name, "BatchNorm1d", num_features=3)
            outputs = []
            with pytest.raises(E.InvalidArgumentError) as info:
                async for o in c.normalize_stream(name, [batch(0), batch(1), batch(2, (4, 5)), batch(3)], "train"):
                    outputs.append(o)
            assert info.value.sequence == 2 and len(outputs) == 2
            # A local encode error: raised after the answers to what was sent.
            outputs = []
            with pytest.raises(E.InvalidArgumentError) as info:
                async for o in c.normalize_stream(name, [batch(4), np.ones((4, 3), np.int32)], "train"):
                    outputs.append(o)
            assert "int32" in info.value.message and len(outputs) == 1
            with pytest.raises(E.NotFoundError) as info:
                async for _ in c.normalize_stream(name + "-missing", [batch(5)], "eval"):
                    pass
            assert info.value.sequence == 0
            with pytest.raises(E.InvalidArgumentError):
                async for _ in c.normalize_stream(name, [batch(6)], "predict"):
                    pass

    run(main())


def test_concurrent_train_requests_on_one_loop(server, name):
    n = 24
    xs = [batch(i, (5, 3)) for i in range(n)]

    async def main():
        async with AsyncClient(server.target, timeout=TIMEOUT) as c:
            await c.create_layer(name, "BatchNorm1d", num_features=3, momentum=None)
            results = await asyncio.gather(*(c.normalize_result(name, x, "train") for x in xs))
            return results, await c.get_state(name, as_torch=True)

    results, state = run(main())
    assert sorted(r.state.version for r in results) == list(range(1, n + 1))
    assert int(state["num_batches_tracked"]) == n
    # momentum=None: the running mean is the mean of the batch means, whatever the order.
    expected = torch.stack([torch.from_numpy(x).mean(0) for x in xs]).mean(0)
    torch.testing.assert_close(state["running_mean"], expected, rtol=1e-5, atol=1e-5)


def test_sync_and_async_clients_agree(server, name):
    xs = [batch(10 + i) for i in range(4)]
    modes = ("train", "eval", "train", "eval")
    with Client(server.target, timeout=TIMEOUT) as c:
        c.create_layer(name + "-s", "BatchNorm1d", num_features=3)
        sync = [c.normalize_result(name + "-s", x, m) for x, m in zip(xs, modes)]
        sync_state = c.get_state(name + "-s")

    async def main():
        async with AsyncClient(server.target, timeout=TIMEOUT) as a:
            await a.create_layer(name + "-a", "BatchNorm1d", num_features=3)
            results = [await a.normalize_result(name + "-a", x, m) for x, m in zip(xs, modes)]
            return results, await a.get_state(name + "-a")

    aio, aio_state = run(main())
    for s, a in zip(sync, aio):
        np.testing.assert_array_equal(s.output, a.output)
        assert s.state == a.state
    for key in sync_state:
        np.testing.assert_array_equal(sync_state[key], aio_state[key])


def test_async_options_compression_metadata_and_timeout(server, name):
    async def main():
        async with AsyncClient(
            server.target,
            timeout=TIMEOUT,
            compression="gzip",
            metadata=[("x-trace-id", "abc")],
            keepalive_time=300,
            keepalive_timeout=20,
        ) as c:
            await c.create_layer(name, "LayerNorm", normalized_shape=[3])
            out = await c.normalize(name, batch(0), "eval", metadata=[("x-more", "1")])
            assert out.shape == (6, 3)
            big = np.random.default_rng(1).normal(size=(64, 128, 128, 3)).astype(np.float32)
            with pytest.raises(E.DeadlineExceededError) as info:
                await c.normalize(name, big, "eval", timeout=0.001)
            assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED

    run(main())


def test_cancelled_task_cancels_the_call(server, name):
    async def main():
        async with AsyncClient(server.target, timeout=TIMEOUT) as c:
            await c.create_layer(name, "BatchNorm2d", num_features=3)
            big = np.random.default_rng(2).normal(size=(32, 3, 256, 256)).astype(np.float32)
            task = asyncio.ensure_future(c.normalize(name, big, "eval"))
            await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            # The client still works afterwards.
            assert (await c.get_layer(name)).state.version == 0

    run(main())


def test_created_outside_a_loop_and_bound_to_the_first_loop_that_uses_it(server, name):
    c = AsyncClient(server.target, timeout=TIMEOUT)  # no running loop here

    async def use():
        return await c.ready()

    assert asyncio.run(use()) is True
    with pytest.raises(RuntimeError, match="event loop"):
        asyncio.run(use())

    async def close():
        await c.close()
        await c.close()  # idempotent
        with pytest.raises(RuntimeError, match="closed"):
            await c.get_layer(name)

    asyncio.run(close())


def test_breaking_out_of_an_async_stream_cancels_it(server, name):
    async def main():
        async with AsyncClient(server.target, timeout=TIMEOUT) as c:
            await c.create_layer(name, "BatchNorm1d", num_features=3)

            async def endless():
                i = 0
                while i < 10_000:  # bounded; the break below ends it long before
                    i += 1
                    yield batch(i)

            n = 0
            stream = c.normalize_stream(name, endless(), "eval")
            async for _ in stream:
                n += 1
                if n == 3:
                    break
            await stream.aclose()
            assert (await c.get_layer(name)).state.version == 0

    run(main())
