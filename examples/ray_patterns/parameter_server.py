"""Parameter server: an actor holds the weights; tasks compute updates.

Synchronous rounds: every worker task gets the current weights (by
reference), returns a gradient, and the server applies their sum.
"""
import ray


@ray.remote
class ParameterServer:
    def __init__(self, size: int):
        self.weights = [0.0] * size

    def apply(self, *gradients):
        for gradient in gradients:
            self.weights = [w + g for w, g in zip(self.weights, gradient)]
        return self.weights

    def get_weights(self):
        return self.weights


@ray.remote
def compute_gradient(weights, worker_index: int):
    # Four workers together pull every weight half way to the target 1.0.
    return [(1.0 - w) / 8 for w in weights]


if __name__ == "__main__":
    ray.init(num_cpus=2)
    server = ParameterServer.remote(3)
    weights = server.get_weights.remote()
    for _ in range(5):
        gradients = [compute_gradient.remote(weights, i) for i in range(4)]
        weights = server.apply.remote(*gradients)   # next round's weights, by reference
    ray.get(weights)
    final = ray.get(server.get_weights.remote())
    print("parameter_server:", [round(w, 6) for w in final])
    ray.shutdown()
