"""A generator task: results stream back to the caller as they are yielded."""
import ray


@ray.remote
def squares(n: int):
    for i in range(n):
        yield i * i


if __name__ == "__main__":
    ray.init(num_cpus=2)
    seen = []
    for ref in squares.remote(6):    # an ObjectRefGenerator
        seen.append(ray.get(ref))
    print("generator:", seen)
    ray.shutdown()
