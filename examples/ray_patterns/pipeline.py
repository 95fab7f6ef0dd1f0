"""A pipeline of stages: each stage an actor, items flow through by reference.

Each item's refs go from one stage to the next without a get in between, so
stage 2 starts on an item as soon as stage 1 is done with it.
"""
import ray


@ray.remote
class Stage:
    def __init__(self, name: str, factor: int):
        self.name = name
        self.factor = factor
        self.seen = 0

    def process(self, item):
        self.seen += 1
        return item * self.factor

    def count(self):
        return self.name, self.seen


@ray.remote
def source(i: int) -> int:
    return i + 1


if __name__ == "__main__":
    ray.init(num_cpus=3)
    double, triple = Stage.remote("double", 2), Stage.remote("triple", 3)
    outputs = [triple.process.remote(double.process.remote(source.remote(i))) for i in range(5)]
    results = ray.get(outputs)
    counts = ray.get([double.count.remote(), triple.count.remote()])
    print("pipeline:", results, dict(counts))
    ray.shutdown()
