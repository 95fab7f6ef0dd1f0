"""Producer and consumer joined by a `ray.util.queue.Queue`.

A task produces items into a bounded queue while a consumer actor takes
them out; `put` blocks when the queue is full, so the producer never runs
far ahead. A `None` marks the end of the stream.
"""
import ray
from ray.util.queue import Queue


@ray.remote
def produce(queue: Queue, count: int) -> int:
    for i in range(count):
        queue.put(i * i)
    queue.put(None)
    return count


@ray.remote
class Consumer:
    def __init__(self):
        self.items = []

    def drain(self, queue: Queue) -> list:
        while True:
            item = queue.get(timeout=60)
            if item is None:
                return self.items
            self.items.append(item)


if __name__ == "__main__":
    ray.init(num_cpus=2)
    queue = Queue(maxsize=3)
    consumer = Consumer.remote()
    drained = consumer.drain.remote(queue)
    produced = ray.get(produce.remote(queue, 10))
    items = ray.get(drained)
    print("queue_pipeline:", produced, sum(items), items[:4])
    ray.shutdown()
