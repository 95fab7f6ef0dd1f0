"""An actor streams results as it produces them; the driver consumes them as
they come and stops an actor that leaves on its own accord.

A stateful reader (an actor) yields batches from a generator method; the
driver waits on two such streams at once with ray.wait and sums what arrives.
A worker that finishes calls exit_actor(): its later calls fail with
ActorDiedError, which the driver expects.
"""
import ray


@ray.remote
class Reader:
    def __init__(self, start: int):
        self.start = start

    def batches(self, count: int):
        for i in range(count):
            yield list(range(self.start + 10 * i, self.start + 10 * i + 3))

    def done(self):
        ray.actor.exit_actor()


if __name__ == "__main__":
    ray.init(num_cpus=2)
    readers = [Reader.remote(0), Reader.remote(1000)]
    streams = [reader.batches.remote(3) for reader in readers]
    total, items = 0, 0
    pending = list(streams)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        stream = ready[0]
        try:
            batch = ray.get(next(stream))
        except StopIteration:
            continue
        total += sum(batch)
        items += 1
        pending.append(stream)
    for reader in readers:
        try:
            ray.get(reader.done.remote())
        except ray.exceptions.ActorDiedError:
            pass
    after = 0
    for reader in readers:
        try:
            ray.get(reader.done.remote())
        except ray.exceptions.ActorDiedError:
            after += 1
    print("actor_stream:", items, total, "exited", after)
    ray.shutdown()
