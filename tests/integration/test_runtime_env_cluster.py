"""A runtime env is prepared on whichever node runs the work."""
from __future__ import annotations

import sys

import cloudpickle


cloudpickle.register_pickle_by_value(sys.modules[__name__])


def test_working_dir_and_py_modules_reach_another_node(tmp_path, cluster):
    wd = tmp_path / "remote_wd"
    wd.mkdir()
    (wd / "remote_helper_mod.py").write_text("WHERE = 'shipped'\n")
    package = tmp_path / "remote_pkg_rte"
    package.mkdir()
    (package / "__init__.py").write_text("VALUE = 7\n")
    far = cluster.add_node(num_cpus=1, resources={"far": 1})
    ray = cluster.connect()

    @ray.remote(resources={"far": 1},
                runtime_env={"working_dir": str(wd), "py_modules": [str(package)],
                             "env_vars": {"RTE_FLAG": "on"}})
    def use():
        import os

        import remote_helper_mod
        import remote_pkg_rte
        return (remote_helper_mod.WHERE, remote_pkg_rte.VALUE, os.environ["RTE_FLAG"],
                ray.get_runtime_context().get_node_id())

    assert ray.get(use.remote(), timeout=120) == ("shipped", 7, "on", far.node_id)
