"""An async service actor, and the ways a Ray program stops or loses work.

- An async actor streams tokens from an async generator method; the caller
  consumes them as they come.
- A slow request is cancelled: its coroutine sees asyncio.CancelledError (the
  service records it) and the caller gets TaskCancelledError.
- A task splits its input into a number of parts it decides while running
  (num_returns="dynamic").
- Arrays from the object store are read-only in tasks: a task that wants to
  change one copies it first.
- A worker actor that exits on its own (sys.exit) is restarted by Ray
  (max_restarts=1); the call that was running when it left fails.
"""
import asyncio
import sys

import numpy as np

import ray


@ray.remote
class Service:
    def __init__(self):
        self.cancelled = 0

    async def tokens(self, text: str):
        for word in text.split():
            await asyncio.sleep(0)
            yield word.upper()

    async def slow(self):
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return "finished"

    async def stats(self):
        return self.cancelled


@ray.remote(num_returns="dynamic")
def split(n: int):
    for start in range(0, n, 4):
        yield list(range(start, min(n, start + 4)))


@ray.remote
def scaled(array):
    try:
        array *= 2                     # a view into the store: read-only
        return "written in place"
    except ValueError:
        return (array * 2).sum().item()


@ray.remote(max_restarts=1)
class Flaky:
    def __init__(self):
        self.calls = 0

    def pid_and_calls(self):
        import os
        self.calls += 1
        return os.getpid(), self.calls

    def leave(self):
        sys.exit(1)


if __name__ == "__main__":
    ray.init(num_cpus=2)
    service = Service.remote()
    words = [ray.get(ref) for ref in service.tokens.options(num_returns="streaming").remote(
        "streams arrive as they come")]

    request = service.slow.remote()
    ray.get(service.stats.remote())    # calls start in order: `slow` is awaiting by now
    ray.cancel(request)
    try:
        ray.get(request)
        outcome = "finished"
    except ray.exceptions.TaskCancelledError:
        outcome = "cancelled"
    seen = ray.get(service.stats.remote())      # the cancelled coroutine's handler ran

    parts = [ray.get(ref) for ref in ray.get(split.remote(10))]

    doubled = ray.get(scaled.remote(ray.put(np.arange(200_000))))   # stored: shared, read-only

    flaky = Flaky.remote()
    first_pid, _ = ray.get(flaky.pid_and_calls.remote())
    try:
        ray.get(flaky.leave.remote())
        left = "no error"
    except ray.exceptions.ActorDiedError:
        left = "died"
    second_pid, calls = ray.get(flaky.pid_and_calls.remote())
    restarted = second_pid != first_pid and calls == 1

    print("async_service:", " ".join(words), outcome, seen, len(parts), parts[-1], doubled,
          left, "restarted" if restarted else "not restarted")
    ray.shutdown()
