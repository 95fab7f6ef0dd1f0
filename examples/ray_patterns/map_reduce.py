"""Map-reduce: count words in parallel, then merge the partial counts.

Plain Ray Core code; run it on meshray with `meshray run map_reduce.py`.
"""
from collections import Counter

import ray

TEXT = """the quick brown fox jumps over the lazy dog
the dog sleeps and the fox runs
a fox and a dog are not the same animal""".split("\n")


@ray.remote
def map_words(line: str) -> Counter:
    return Counter(line.split())


@ray.remote
def reduce_counts(*partials: Counter) -> Counter:
    total = Counter()
    for partial in partials:
        total.update(partial)
    return total


if __name__ == "__main__":
    ray.init(num_cpus=2)
    partials = [map_words.remote(line) for line in TEXT]
    counts = ray.get(reduce_counts.remote(*partials))
    top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:3]
    print("map_reduce:", " ".join(f"{word}={n}" for word, n in top))
    ray.shutdown()
