"""A standard-library `multiprocessing.Pool` program, ported by one import.

The program counts primes below a bound in chunks; only the import line
differs from the standard-library version (`ray.util.multiprocessing`
instead of `multiprocessing`). The pool starts Ray itself when needed; this
script starts it explicitly to size it.
"""
import ray
from ray.util.multiprocessing import Pool


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    return all(n % d for d in range(2, int(n ** 0.5) + 1))


def count_primes(bounds: tuple) -> int:
    low, high = bounds
    return sum(1 for n in range(low, high) if is_prime(n))


if __name__ == "__main__":
    ray.init(num_cpus=2)
    chunks = [(low, low + 1000) for low in range(0, 10_000, 1000)]
    with Pool(processes=2) as pool:
        counts = pool.map(count_primes, chunks)
        magnitudes = sorted(pool.imap_unordered(abs, [-2, 3, -4]))   # builtins ship too
        largest = pool.apply(max, ([7, 3, 9],))
    print("multiprocessing_pool:", sum(counts), counts[:3], magnitudes, largest)
    ray.shutdown()
