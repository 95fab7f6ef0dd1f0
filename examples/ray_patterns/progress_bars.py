"""Progress bars from remote tasks, drawn by the driver (ray.experimental.tqdm_ray)."""
import ray
from ray.experimental import tqdm_ray


@ray.remote
def crunch(name: str, steps: int) -> int:
    bar = tqdm_ray.tqdm(total=steps, desc=name)
    done = 0
    for _ in range(steps):
        done += 1
        bar.update(1)
    bar.close()
    return done


if __name__ == "__main__":
    ray.init(num_cpus=2)
    counts = ray.get([crunch.remote(f"part-{i}", 20 + i) for i in range(3)])
    print("progress_bars:", counts)
    ray.shutdown()
