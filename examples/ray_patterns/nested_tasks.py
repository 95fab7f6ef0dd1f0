"""Nested tasks: a task that submits tasks and waits on them (a parallel sum).

A task blocked in ray.get lends its CPU back, so a recursion deeper than the
CPU count still finishes.
"""
import ray


@ray.remote
def tree_sum(values):
    if len(values) <= 2:
        return sum(values)
    middle = len(values) // 2
    left = tree_sum.remote(values[:middle])
    right = tree_sum.remote(values[middle:])
    return ray.get(left) + ray.get(right)


if __name__ == "__main__":
    ray.init(num_cpus=2)
    print("nested_tasks:", ray.get(tree_sum.remote(list(range(1, 33)))))
    ray.shutdown()
