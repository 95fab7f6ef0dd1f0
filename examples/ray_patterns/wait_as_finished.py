"""Process results as they finish, with `ray.wait`.

Instead of `ray.get` on the whole list (which waits for the slowest task
before anything is processed), take one finished ref at a time and handle it
while the rest still run.
"""
import time

import ray


@ray.remote
def work(i: int) -> int:
    time.sleep(0.05 * (i % 4))      # tasks finish out of submission order
    return i * 10


if __name__ == "__main__":
    ray.init(num_cpus=2)
    pending = [work.remote(i) for i in range(8)]
    handled = []
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        handled.append(ray.get(done[0]))    # process this one now
    print("wait_as_finished:", len(handled), sum(handled), sorted(handled)[:3])
    ray.shutdown()
