"""Shared-memory object store: one file per object in a per-node /dev/shm directory.

``layout`` is the file format that every process uses to write and map
objects; ``store`` is the node daemon's capacity and spilling bookkeeping;
``eviction`` is the pure spill policy; ``shm_dirs`` makes the private
directories and picks the default capacity.
"""

from meshray.object_store.eviction import SpillCandidate, choose_spill_victims
from meshray.object_store.layout import (
    ALIGNMENT,
    FORMAT_VERSION,
    MAGIC,
    ChunkWriter,
    CorruptObjectError,
    ObjectLayout,
    copy_file_chunks,
    object_size,
    read_object,
    read_object_layout,
    unpack_object,
    write_object,
    write_object_into,
)
from meshray.object_store.shm_dirs import (
    DEFAULT_CAPACITY_FRACTION,
    default_capacity,
    make_private_dir,
)
from meshray.object_store.store import (
    ObjectExistsError,
    ObjectStateError,
    ObjectStore,
    ObjectStoreFullError,
    UnknownObjectError,
)

__all__ = [
    "ALIGNMENT",
    "DEFAULT_CAPACITY_FRACTION",
    "FORMAT_VERSION",
    "MAGIC",
    "ChunkWriter",
    "CorruptObjectError",
    "ObjectExistsError",
    "ObjectLayout",
    "ObjectStateError",
    "ObjectStore",
    "ObjectStoreFullError",
    "SpillCandidate",
    "UnknownObjectError",
    "choose_spill_victims",
    "copy_file_chunks",
    "default_capacity",
    "make_private_dir",
    "object_size",
    "read_object",
    "read_object_layout",
    "unpack_object",
    "write_object",
    "write_object_into",
]
