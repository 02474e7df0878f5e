"""A service's event loop never waits on Genie (issue 18): ``genie.call`` records a new step on a
worker thread while the loop serves other tasks, replays a recorded one on the loop at once, and
``genie.fetch`` does not block the loop while another task's step records. Prompts of any length in
a bucket replay one prefill (examples/llm_server.py). Under trio and asyncio, against a real
``genie serve``.

What is asserted is structure (which thread recorded, that the loop ran another task meanwhile, how
many recordings and replays), never milliseconds: ``bench/serve_loop.py`` measures the loop's lag.
"""

from __future__ import annotations

import asyncio
import threading

import _server_fixtures as fx
import pytest
import torch
import trio
from _models import greedy, llm_server_example
from torch import nn

import genie

server, remote = fx.server, fx.remote  # fixtures, by name
DEV = "remote_accelerator:0"
WAIT = 60.0  # seconds a thread waits for the loop before the test calls it stuck


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8)).eval()


class Step:
    """A compiled step whose Python body (run only when it records) notes its thread and can be
    held at a gate, so a test sees where a recording runs and what the loop does meanwhile."""

    def __init__(self, model: nn.Module) -> None:
        self.threads: list[int] = []
        self.entered = threading.Event()
        self.gate: threading.Event | None = None
        self.fn = genie.compile(self.body)
        self.model = model

    def body(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        self.threads.append(threading.get_ident())
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(WAIT), "the event loop never ran while this step recorded"
        with torch.no_grad():
            return model(x.to(DEV)) * 2


def _want(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x) * 2


# -- genie.call -----------------------------------------------------------------------------------
async def _record_then_replay(step: Step, model: nn.Module, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    outs = []
    for x in xs:
        y = await genie.call(step.fn, model, x)
        (host,) = await genie.fetch(y)
        outs.append(host)
    return outs


def _check_record_then_replay(step: Step, loop_thread: int, outs: list, cpu_model, xs) -> None:
    assert len(step.threads) == 1, "the step recorded more than once: the later calls did not replay"
    assert step.threads[0] != loop_thread, "the recording ran on the event loop's thread"
    assert step.fn.records == 1 and step.fn.replays == len(xs) - 1
    for got, x in zip(outs, xs, strict=True):
        torch.testing.assert_close(got, _want(cpu_model, x))


async def test_a_first_call_records_off_the_loop_and_later_calls_replay_under_trio(remote):
    cpu_model = _mlp()
    model = _mlp().to(DEV)
    step = Step(model)
    xs = [torch.randn(4, 16) for _ in range(3)]
    outs = await _record_then_replay(step, model, xs)
    _check_record_then_replay(step, threading.get_ident(), outs, cpu_model, xs)


def test_a_first_call_records_off_the_loop_and_later_calls_replay_under_asyncio(remote):
    cpu_model = _mlp()
    model = _mlp().to(DEV)
    step = Step(model)
    xs = [torch.randn(4, 16) for _ in range(3)]
    outs = asyncio.run(_record_then_replay(step, model, xs))
    _check_record_then_replay(step, threading.get_ident(), outs, cpu_model, xs)


async def test_the_loop_runs_other_tasks_while_a_step_records_under_trio(remote):
    """The recording waits at a gate that only another task of the loop opens: if it ran on the
    loop's thread, that task could never run and the gate would time out."""
    model = _mlp().to(DEV)
    step = Step(model)
    step.gate = threading.Event()
    ticks = 0
    x = torch.randn(4, 16)

    async def other_task() -> None:
        nonlocal ticks
        await trio.to_thread.run_sync(step.entered.wait, WAIT)  # the recording has started
        ticks += 1
        step.gate.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other_task)
        y = await genie.call(step.fn, model, x)
    assert ticks == 1 and step.fn.records == 1
    (got,) = await genie.fetch(y)
    torch.testing.assert_close(got, _want(_mlp(), x))


def test_the_loop_runs_other_tasks_while_a_step_records_under_asyncio(remote):
    model = _mlp().to(DEV)
    step = Step(model)
    step.gate = threading.Event()
    x = torch.randn(4, 16)

    async def main() -> torch.Tensor:
        async def other_task() -> None:
            await asyncio.get_running_loop().run_in_executor(None, step.entered.wait, WAIT)
            step.gate.set()

        opener = asyncio.create_task(other_task())
        y = await genie.call(step.fn, model, x)
        await opener
        (got,) = await genie.fetch(y)
        return got

    torch.testing.assert_close(asyncio.run(main()), _want(_mlp(), x))
    assert step.fn.records == 1


async def test_a_fetch_does_not_block_the_loop_while_another_task_records(remote):
    """Task A's step records (holding the recorder) until task C opens its gate; task B fetches a
    value meanwhile, which needs the recorder: if B's fetch waited on the loop's thread, C could
    never run."""
    model = _mlp().to(DEV)
    step = Step(model)
    step.gate = threading.Event()
    ready = torch.arange(6.0).to(DEV) * 3  # a value of this thread's recorder, to fetch
    (before,) = await genie.fetch(ready)
    plus = ready + 1  # recorded now: a plain op on the loop's thread would wait for A's recording
    fetched: list[torch.Tensor] = []
    fetching = trio.Event()

    async def task_a() -> None:
        await genie.call(step.fn, model, torch.randn(4, 16))

    async def task_b() -> None:
        await trio.to_thread.run_sync(step.entered.wait, WAIT)
        fetching.set()
        fetched.extend(await genie.fetch(plus))

    async def task_c() -> None:
        await fetching.wait()
        await trio.sleep(0)  # B is inside its fetch now
        step.gate.set()

    async with trio.open_nursery() as nursery:
        for t in (task_a, task_b, task_c):
            nursery.start_soon(t)
    torch.testing.assert_close(fetched[0], before + 1)


async def test_a_call_runs_under_the_callers_grad_mode(remote):
    x = torch.ones(3).to(DEV)

    def mode(t: torch.Tensor) -> tuple[bool, torch.Tensor]:
        return torch.is_grad_enabled(), t + 1

    with torch.no_grad():
        off, _ = await genie.call(mode, x)
    on, y = await genie.call(mode, x)
    assert (off, on) == (False, True)
    (got,) = await genie.fetch(y)
    torch.testing.assert_close(got, torch.full((3,), 2.0))


async def test_a_cancelled_call_still_keeps_its_recording(remote):
    model = _mlp().to(DEV)
    step = Step(model)
    step.gate = threading.Event()
    x = torch.randn(4, 16)
    with trio.CancelScope() as scope:
        async def cancel_when_recording() -> None:
            await trio.to_thread.run_sync(step.entered.wait, WAIT)
            scope.cancel()
            step.gate.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(cancel_when_recording)
            await genie.call(step.fn, model, x)
    assert scope.cancelled_caught
    # the recording went on in its thread; this call waits for it, then replays what it recorded
    y = await genie.call(step.fn, model, x)
    assert step.fn.records == 1 and step.fn.replays == 1
    (got,) = await genie.fetch(y)
    torch.testing.assert_close(got, _want(_mlp(), x))


# -- the example: prompt lengths bucketed, so prefill replays --------------------------------------


@pytest.mark.parametrize("name", ["gpt2", "llama"])
async def test_prompts_of_one_bucket_replay_one_prefill_and_equal_eager(remote, name):
    llm = llm_server_example()
    gen = llm.Generator(llm.build_model(name))
    cpu = llm.build_model(name)
    prompts = [[5, 7, 9, 11, 13, 15, 17, 19, 21], list(range(30, 43)), [3] * 16]  # 9, 13, 16: bucket 16
    for prompt in prompts:
        got = [t async for t in gen.stream(prompt, 4)]
        assert got == greedy(cpu, prompt, 4), prompt
    assert gen.prefill.records == 1 and gen.prefill.replays == len(prompts) - 1
    assert gen.decode.records == 1 and gen.decode.replays == len(prompts) * 3 - 1
