"""A placement group reserves bundles; tasks run inside its bundles."""
import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy


@ray.remote(num_cpus=1)
def where(index: int):
    return index, ray.get_runtime_context().get_node_id()


if __name__ == "__main__":
    ray.init(num_cpus=2)
    group = placement_group([{"CPU": 1}, {"CPU": 1}], strategy="PACK")
    ray.get(group.ready(), timeout=60)
    refs = [where.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
        placement_group=group, placement_group_bundle_index=i % 2)).remote(i) for i in range(4)]
    results = ray.get(refs)
    nodes = {node for _, node in results}
    print("placement_group:", sorted(i for i, _ in results), "nodes", len(nodes))
    remove_placement_group(group)
    ray.shutdown()
