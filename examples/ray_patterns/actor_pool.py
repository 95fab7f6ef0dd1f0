"""Batch inference with a pool of model actors (`ray.util.ActorPool`).

Each actor loads its "model" once; the pool hands every batch to whichever
actor is free and `map` gives the predictions back in input order.
"""
import ray
from ray.util import ActorPool


@ray.remote
class Model:
    def __init__(self, weight: int):
        self.weight = weight        # stands for weights loaded once per actor

    def predict(self, batch: list) -> list:
        return [self.weight * x + 1 for x in batch]


if __name__ == "__main__":
    ray.init(num_cpus=2)
    pool = ActorPool([Model.remote(3), Model.remote(3)])
    batches = [list(range(i, i + 4)) for i in range(0, 16, 4)]
    predictions = pool.map(lambda model, batch: model.predict.remote(batch), batches)
    flat = [y for batch in predictions for y in batch]
    print("actor_pool:", len(flat), sum(flat), flat[:4])
    ray.shutdown()
