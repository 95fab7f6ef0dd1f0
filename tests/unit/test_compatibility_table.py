"""docs/compatibility.md's "Ray 2.60 Core surface" table stays true.

Every row's Ray name is resolved the way `import ray` resolves it under
`meshray run`: the longest module prefix the alias finder answers for is
imported, the rest is looked up by getattr. A `supported`/`differs` row must
resolve and a `missing` row must not, so a row goes stale in neither
direction; and every public meshray name Ray also has must have a row: each
module's `__all__`, and each public member of the classes programs call most
(`PUBLIC_CLASSES`).
"""
from __future__ import annotations

import importlib
import os
import re

import pytest

from meshray.core.ray_alias import RayAliasFinder
from tests.helpers import REPO

DOC = os.path.join(REPO, "docs", "compatibility.md")
SECTION = "## Ray 2.60 Core surface"
STATUSES = ("supported", "differs", "missing")
ROW = re.compile(r"^\| `(?P<name>ray(?:\.\w+)*)` \| (?P<status>\w+) \|(?P<notes>.*)\|$")

PUBLIC_MODULES = (
    "meshray", "meshray.util", "meshray.util.state", "meshray.exceptions", "meshray.actor",
    "meshray.util.scheduling_strategies", "meshray.util.placement_group", "meshray.util.queue",
    "meshray.util.multiprocessing",
)

# Classes whose every public member (a name not starting with "_") needs a row.
PUBLIC_CLASSES = ("ray.runtime_context.RuntimeContext", "ray.ObjectRef", "ray.ObjectRefGenerator",
                  "ray.util.ActorPool")

# Public meshray names with no Ray 2.60 name of the same path, and why.
MESHRAY_ONLY = {
    "ray.actor.get_actor": "Ray has it only as ray.get_actor",
    "ray.util.PlacementGroup": "Ray has it only in ray.util.placement_group",
    "ray.util.placement_group.validate_request_fits_bundle": "meshray's own bundle check",
    "ray.util.multiprocessing.AsyncResult": "Ray has it only in ray.util.multiprocessing.pool",
    "ray.util.multiprocessing.IMapIterator": "Ray has it only in ray.util.multiprocessing.pool",
    "ray.util.state.RayStateApiException": "Ray has it in ray.util.state.exception",
    **{f"ray.util.state.{name}": "Ray has it in ray.util.state.common"
       for name in ("ActorState", "JobState", "NodeState", "ObjectState",
                    "PlacementGroupState", "TaskState", "WorkerState")},
    **{f"ray.exceptions.{name}": "in Ray before 2.60; kept for programs that catch it"
       for name in ("ObjectReconstructionFailedMaxAttemptsExceededError",
                    "ObjectReconstructionFailedLineageEvictedError",
                    "PlacementGroupSchedulingError")},
}


def table_rows() -> list[tuple[str, str, str]]:
    """(name, status, notes) for each row of the section's table."""
    with open(DOC, encoding="utf-8") as handle:
        text = handle.read()
    assert SECTION in text, f"{DOC} has no {SECTION!r} section"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        match = ROW.match(line)
        assert match, f"malformed row in {SECTION!r}: {line!r}"
        rows.append((match["name"], match["status"], match["notes"].strip()))
    return rows


def _module_for(ray_name: str):
    """The meshray module `import ray_name` gives under the alias, or None."""
    try:
        spec = RayAliasFinder().find_spec(ray_name)
    except ModuleNotFoundError:
        return None
    return importlib.import_module(spec.loader.target)


def resolve(ray_name: str):
    """What `ray_name` is under `meshray run`; AttributeError/ImportError when nothing."""
    parts = ray_name.split(".")
    for split in range(len(parts), 0, -1):
        module = _module_for(".".join(parts[:split]))
        if module is None:
            continue
        value = module
        for attribute in parts[split:]:
            value = getattr(value, attribute)
        return value
    raise ImportError(f"no meshray module stands for any prefix of {ray_name!r}")


def resolves(ray_name: str) -> bool:
    try:
        resolve(ray_name)
    except (AttributeError, ImportError):
        return False
    return True


ROWS = table_rows()


def test_table_rows_are_well_formed_and_unique():
    names = [name for name, _, _ in ROWS]
    assert len(names) > 150, "the table lost its rows"
    assert len(names) == len(set(names)), sorted({n for n in names if names.count(n) > 1})
    bad = [(name, status) for name, status, _ in ROWS if status not in STATUSES]
    assert not bad, f"status must be one of {STATUSES}: {bad}"
    # A row that differs says how.
    unexplained = [name for name, status, notes in ROWS
                   if status == "differs" and not notes]
    assert not unexplained


@pytest.mark.parametrize("name", [n for n, s, _ in ROWS if s != "missing"])
def test_supported_row_resolves_under_the_alias(name):
    assert resolves(name), f"{name} is marked supported/differs but `import ray` lacks it"


@pytest.mark.parametrize("name", [n for n, s, _ in ROWS if s == "missing"])
def test_missing_row_does_not_resolve(name):
    assert not resolves(name), f"{name} is marked missing but resolves: {resolve(name)!r}"


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_every_public_name_ray_also_has_is_in_the_table(module_name):
    listed = {name for name, _, _ in ROWS}
    module = importlib.import_module(module_name)
    ray_prefix = "ray" + module_name[len("meshray"):]
    absent = [f"{ray_prefix}.{name}" for name in module.__all__
              if f"{ray_prefix}.{name}" not in listed
              and f"{ray_prefix}.{name}" not in MESHRAY_ONLY]
    assert not absent, f"public names with no row in {SECTION!r}: {absent}"


@pytest.mark.parametrize("class_name", PUBLIC_CLASSES)
def test_every_public_member_of_the_main_classes_is_in_the_table(class_name):
    listed = {name for name, _, _ in ROWS}
    cls = resolve(class_name)
    members = [name for name in dir(cls) if not name.startswith("_")]
    assert members, f"{class_name} resolved to {cls!r}, which has no public members"
    absent = [f"{class_name}.{name}" for name in members
              if f"{class_name}.{name}" not in listed
              and f"{class_name}.{name}" not in MESHRAY_ONLY]
    assert not absent, f"public members with no row in {SECTION!r}: {absent}"


def test_no_exception_ray_has_is_missing():
    # docs/compatibility.md's Exceptions paragraph says meshray has them all.
    lacking = [name for name, status, _ in ROWS
               if name.startswith("ray.exceptions.") and status == "missing"]
    assert not lacking


def test_meshray_only_names_exist_and_have_no_row():
    listed = {name for name, _, _ in ROWS}
    assert not listed & set(MESHRAY_ONLY)
    assert all(resolves(name) for name in MESHRAY_ONLY), \
        [name for name in MESHRAY_ONLY if not resolves(name)]


def test_resolution_follows_the_alias():
    # The alias maps modules; attributes hang off the module that holds them.
    from meshray.util.queue import Queue
    assert resolve("ray.util.queue.Queue") is Queue
    assert resolve("ray.remote_function.RemoteFunction").__module__ == \
        "meshray.core.remote_function"
    assert not resolves("ray.data") and not resolves("ray.util.no_such_name")
