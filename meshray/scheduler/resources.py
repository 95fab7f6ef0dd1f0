"""Resource arithmetic in fixed-point units.

Quantities are stored as integers of 1/10_000 of a unit (Ray's granularity),
because summing and subtracting floats such as 0.1 drifts: after ten 0.1-CPU
tasks come and go a node would report 0.9999999999999999 CPUs free and refuse
a 1-CPU task forever. Integers make `acquire` followed by `release` restore
exactly the state before.

Conversion from a float rounds to the nearest unit, so a request for 1/3 GPU
becomes 3333 units and three of them fit in one GPU. Only non-zero quantities
below one unit are rejected: they would silently become free.

Three layers live here:

* `ResourceSet` - an immutable bag of named quantities, the currency of the
  scheduler and the cluster view.
* `UnitInstanceAllocator` / `GpuAllocator` - which *device* a request gets,
  for resources that exist as discrete instances (GPUs): a fractional request
  must land on one device, a whole request takes whole devices.
* `NodeResources` - one node's ledger (total, available) that refuses to go
  negative or above total, with optional instance allocators attached.
"""
from __future__ import annotations

import math
import numbers
from types import MappingProxyType
from typing import Callable, Dict, Hashable, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

__all__ = [
    "UNIT_SCALE",
    "RESOURCE_PRECISION",
    "UNIT_INSTANCE_RESOURCES",
    "ResourceAccountingError",
    "to_units",
    "from_units",
    "ResourceSet",
    "UnitInstanceAllocator",
    "GpuAllocator",
    "Allocation",
    "NodeResources",
]

#: Fixed-point scale: one unit of a resource is this many integer steps.
UNIT_SCALE = 10_000
#: The smallest non-zero quantity a request may name.
RESOURCE_PRECISION = 1 / UNIT_SCALE
#: Resources that exist as discrete devices; requests above 1 must be whole.
UNIT_INSTANCE_RESOURCES = frozenset({"GPU"})


class ResourceAccountingError(RuntimeError):
    """Raised when a release would push a ledger above its total.

    That can only happen when something releases twice or releases what it
    never acquired, i.e. a bug in the caller; failing loudly keeps the bug
    from turning into phantom capacity.
    """


def to_units(name: str, quantity: object) -> int:
    """Convert a user-facing quantity to fixed-point units, validating it."""
    if isinstance(quantity, bool) or not isinstance(quantity, numbers.Real):
        raise TypeError(
            f"Resource {name!r} must be a non-negative number, got {quantity!r} "
            f"of type {type(quantity).__name__}."
        )
    if isinstance(quantity, numbers.Integral):
        value = int(quantity)
        if value < 0:
            raise ValueError(f"Resource {name!r} must be >= 0, got {quantity!r}.")
        return value * UNIT_SCALE
    q = float(quantity)
    if math.isnan(q) or math.isinf(q):
        raise ValueError(f"Resource {name!r} must be a finite number >= 0, got {quantity!r}.")
    if q < 0:
        raise ValueError(f"Resource {name!r} must be >= 0, got {quantity!r}.")
    units = int(round(q * UNIT_SCALE))
    if q > 0 and units == 0:
        raise ValueError(
            f"Resource {name!r} quantity {quantity!r} is below the precision "
            f"{RESOURCE_PRECISION}; use 0 or at least {RESOURCE_PRECISION}."
        )
    return units


def from_units(units: int) -> float:
    """Convert fixed-point units back to a float quantity."""
    return units / UNIT_SCALE


class ResourceSet(Mapping[str, float]):
    """An immutable mapping of resource name to quantity.

    Zero quantities are dropped, so two sets that mean the same request
    compare (and hash) equal regardless of how they were spelled. Reading it
    as a mapping yields floats; `units()` gives the exact integers.
    """

    __slots__ = ("_units", "_hash")

    def __init__(self, quantities: Optional[Mapping[str, object]] = None):
        units: Dict[str, int] = {}
        if quantities:
            for name, quantity in quantities.items():
                if not isinstance(name, str) or not name:
                    raise TypeError(
                        f"Resource names must be non-empty strings, got {name!r}."
                    )
                u = to_units(name, quantity)
                if u:
                    units[name] = u
        self._units = units
        self._hash: Optional[int] = None

    # -- construction -----------------------------------------------------
    @classmethod
    def from_dict(cls, quantities: Optional[Mapping[str, object]]) -> "ResourceSet":
        """Build from a {name: float} dict (None means empty)."""
        return cls(quantities)

    @classmethod
    def from_units(cls, units: Mapping[str, int]) -> "ResourceSet":
        """Build from already-scaled integer units (no float rounding)."""
        clean: Dict[str, int] = {}
        for name, u in units.items():
            if isinstance(u, bool) or not isinstance(u, numbers.Integral) or u < 0:
                raise ValueError(f"Units for resource {name!r} must be an int >= 0, got {u!r}.")
            if u:
                clean[name] = int(u)
        return cls._wrap(clean)

    @classmethod
    def _wrap(cls, units: Dict[str, int]) -> "ResourceSet":
        # Trusted constructor: `units` is already clean and owned by us.
        obj = cls.__new__(cls)
        obj._units = units
        obj._hash = None
        return obj

    def __reduce__(self):
        return (_rebuild_resource_set, (dict(self._units),))

    # -- reading ----------------------------------------------------------
    def to_dict(self) -> Dict[str, float]:
        return {name: u / UNIT_SCALE for name, u in self._units.items()}

    def units(self, name: str) -> int:
        return self._units.get(name, 0)

    def as_units(self) -> Mapping[str, int]:
        """A read-only view of the integer units (for hot loops)."""
        return MappingProxyType(self._units)

    def get(self, name: str, default: float = 0.0) -> float:  # type: ignore[override]
        u = self._units.get(name)
        return default if u is None else u / UNIT_SCALE

    @property
    def names(self) -> frozenset:
        return frozenset(self._units)

    def is_empty(self) -> bool:
        return not self._units

    def __getitem__(self, name: str) -> float:
        return self._units[name] / UNIT_SCALE

    def __iter__(self) -> Iterator[str]:
        return iter(self._units)

    def __len__(self) -> int:
        return len(self._units)

    def __contains__(self, name: object) -> bool:
        return name in self._units

    # -- comparison -------------------------------------------------------
    def fits_in(self, other: "ResourceSet") -> bool:
        """True if every quantity here is <= the same quantity in `other`."""
        o = other._units
        for name, u in self._units.items():
            if o.get(name, 0) < u:
                return False
        return True

    def __le__(self, other: "ResourceSet") -> bool:
        if not isinstance(other, ResourceSet):
            return NotImplemented
        return self.fits_in(other)

    def __ge__(self, other: "ResourceSet") -> bool:
        if not isinstance(other, ResourceSet):
            return NotImplemented
        return other.fits_in(self)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ResourceSet):
            return self._units == other._units
        if isinstance(other, Mapping):
            try:
                return self == ResourceSet(other)
            except (TypeError, ValueError):
                return False
        return NotImplemented

    def __ne__(self, other: object) -> bool:
        eq = self.__eq__(other)
        return eq if eq is NotImplemented else not eq

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash(frozenset(self._units.items()))
        return self._hash

    # -- arithmetic -------------------------------------------------------
    def __add__(self, other: "ResourceSet") -> "ResourceSet":
        if not isinstance(other, ResourceSet):
            return NotImplemented
        out = dict(self._units)
        for name, u in other._units.items():
            out[name] = out.get(name, 0) + u
        return ResourceSet._wrap(out)

    def __sub__(self, other: "ResourceSet") -> "ResourceSet":
        """Difference; raises ValueError rather than going negative."""
        if not isinstance(other, ResourceSet):
            return NotImplemented
        out = dict(self._units)
        for name, u in other._units.items():
            left = out.get(name, 0) - u
            if left < 0:
                raise ValueError(
                    f"Cannot subtract {other!r} from {self!r}: resource {name!r} "
                    f"would be {left / UNIT_SCALE} (expected >= 0)."
                )
            if left:
                out[name] = left
            else:
                out.pop(name, None)
        return ResourceSet._wrap(out)

    def __repr__(self) -> str:
        return f"ResourceSet({self.to_dict()!r})"


def _rebuild_resource_set(units: Dict[str, int]) -> ResourceSet:
    return ResourceSet._wrap(units)


def _as_resource_set(value: Union[ResourceSet, Mapping[str, object], None]) -> ResourceSet:
    if isinstance(value, ResourceSet):
        return value
    return ResourceSet(value)


class UnitInstanceAllocator:
    """Decides which discrete instances (e.g. GPU devices) serve a request.

    A fractional request (< 1) gets capacity on exactly one instance, since
    a process cannot use "0.3 of GPU 0 and 0.2 of GPU 1". Among instances
    with room it picks the fullest one (best fit), so small requests pack
    together and whole instances stay free for whole requests. A whole
    request (1, 2, ...) takes that many completely free instances. Ties go
    to the instance listed first, so assignments are deterministic.
    """

    def __init__(self, instance_ids: Sequence[Hashable], resource_name: str = "resource"):
        ids = list(instance_ids)
        if len(set(ids)) != len(ids):
            raise ValueError(f"instance_ids must be unique, got {ids!r}.")
        self._name = resource_name
        self._ids: List[Hashable] = ids
        self._free: Dict[Hashable, int] = {i: UNIT_SCALE for i in ids}

    @property
    def instance_ids(self) -> Tuple[Hashable, ...]:
        return tuple(self._ids)

    def free(self, instance_id: Hashable) -> float:
        """Free capacity left on one instance (0.0 .. 1.0)."""
        return self._free[instance_id] / UNIT_SCALE

    def free_units(self) -> int:
        return sum(self._free.values())

    def available(self) -> float:
        return self.free_units() / UNIT_SCALE

    def snapshot(self) -> Dict[Hashable, float]:
        return {i: self._free[i] / UNIT_SCALE for i in self._ids}

    def _amount_units(self, amount: object) -> int:
        units = to_units(self._name, amount)
        if units > UNIT_SCALE and units % UNIT_SCALE:
            raise ValueError(
                f"{self._name} amount {amount!r} is invalid: amounts above 1 must "
                f"be whole numbers (a request cannot span part of several devices)."
            )
        return units

    def can_assign(self, amount: object) -> bool:
        return self._pick(self._amount_units(amount)) is not None

    def _pick(self, units: int) -> Optional[List[Hashable]]:
        if units == 0:
            return []
        if units < UNIT_SCALE:
            best = None
            best_free = UNIT_SCALE + 1
            for i in self._ids:
                f = self._free[i]
                if units <= f < best_free:
                    best, best_free = i, f
            return None if best is None else [best]
        need = units // UNIT_SCALE
        whole = [i for i in self._ids if self._free[i] == UNIT_SCALE]
        if len(whole) < need:
            return None
        return whole[:need]

    def assign(self, amount: object) -> Optional[List[Hashable]]:
        """Reserve `amount`; returns the instance ids used, or None if it can't fit now."""
        units = self._amount_units(amount)
        picked = self._pick(units)
        if picked is None:
            return None
        if units < UNIT_SCALE:
            if picked:
                self._free[picked[0]] -= units
        else:
            for i in picked:
                self._free[i] = 0
        return picked

    def release(self, ids: Iterable[Hashable], amount: object) -> None:
        """Return what `assign(amount)` gave out as `ids`; validated before mutating."""
        ids = list(ids)
        units = self._amount_units(amount)
        for i in ids:
            if i not in self._free:
                raise ResourceAccountingError(
                    f"Cannot release {self._name} instance {i!r}: unknown instance "
                    f"(known: {self._ids!r})."
                )
        if units == 0:
            if ids:
                raise ResourceAccountingError(
                    f"Cannot release {self._name} amount 0 on instances {ids!r}."
                )
            return
        if units < UNIT_SCALE:
            if len(ids) != 1:
                raise ResourceAccountingError(
                    f"A fractional {self._name} amount {amount!r} lives on exactly one "
                    f"instance, got ids {ids!r}."
                )
            if self._free[ids[0]] + units > UNIT_SCALE:
                raise ResourceAccountingError(
                    f"Releasing {amount!r} {self._name} on instance {ids[0]!r} would exceed "
                    f"its capacity (free {self.free(ids[0])}); released twice?"
                )
            self._free[ids[0]] += units
            return
        need = units // UNIT_SCALE
        if len(ids) != need or len(set(ids)) != need:
            raise ResourceAccountingError(
                f"Releasing {amount!r} {self._name} needs {need} distinct instance ids, got {ids!r}."
            )
        for i in ids:
            if self._free[i] != 0:
                raise ResourceAccountingError(
                    f"Releasing whole {self._name} instance {i!r} that is not fully "
                    f"assigned (free {self.free(i)}); released twice?"
                )
        for i in ids:
            self._free[i] = UNIT_SCALE

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.snapshot()!r})"


class GpuAllocator(UnitInstanceAllocator):
    """`UnitInstanceAllocator` for GPU device indices."""

    def __init__(self, device_ids: Sequence[Hashable]):
        super().__init__(device_ids, resource_name="GPU")


class Allocation:
    """What `NodeResources.allocate` handed out, so it can be given back exactly once."""

    __slots__ = ("resources", "instances", "_released")

    def __init__(self, resources: ResourceSet, instances: Dict[str, Tuple[Hashable, ...]]):
        self.resources = resources
        #: resource name -> instance ids assigned (e.g. {"GPU": (0,)}).
        self.instances = instances
        self._released = False

    @property
    def released(self) -> bool:
        return self._released

    def __repr__(self) -> str:
        return f"Allocation({self.resources!r}, instances={self.instances!r}, released={self._released})"


class NodeResources:
    """One node's resource ledger.

    `available` never goes below zero (acquire refuses instead) nor above
    `total` (release raises `ResourceAccountingError`). Resources given in
    `instances` are also tracked per device; requests touching them must use
    `allocate()` / `release(allocation)` so the scalar count and the device
    assignment can't drift apart.
    """

    def __init__(
        self,
        total: Union[ResourceSet, Mapping[str, object]],
        *,
        instances: Optional[Mapping[str, Sequence[Hashable]]] = None,
    ):
        self._total = _as_resource_set(total)
        self._avail: Dict[str, int] = dict(self._total.as_units())
        self._avail_cache: Optional[ResourceSet] = self._total
        # Called after every change to `available` (the node's membership
        # publishes on it instead of polling); must be cheap and not raise.
        self.on_change: Optional[Callable[[], None]] = None
        self._allocators: Dict[str, UnitInstanceAllocator] = {}
        for name, ids in (instances or {}).items():
            ids = list(ids)
            if self._total.units(name) != len(ids) * UNIT_SCALE:
                raise ValueError(
                    f"Resource {name!r} total {self._total.get(name)} must equal the number "
                    f"of instances given ({len(ids)}: {ids!r})."
                )
            self._allocators[name] = (
                GpuAllocator(ids) if name == "GPU" else UnitInstanceAllocator(ids, name)
            )

    @property
    def total(self) -> ResourceSet:
        return self._total

    @property
    def available(self) -> ResourceSet:
        if self._avail_cache is None:
            self._avail_cache = ResourceSet._wrap({k: v for k, v in self._avail.items() if v})
        return self._avail_cache

    @property
    def used(self) -> ResourceSet:
        return self._total - self.available

    def allocator(self, name: str) -> Optional[UnitInstanceAllocator]:
        return self._allocators.get(name)

    def is_feasible(self, request: Union[ResourceSet, Mapping[str, object]]) -> bool:
        """Could this ever fit here (against total, ignoring current use)?"""
        return _as_resource_set(request).fits_in(self._total)

    def can_fit(self, request: Union[ResourceSet, Mapping[str, object]]) -> bool:
        """Does it fit in what is free right now (scalar view)?"""
        req = _as_resource_set(request)
        a = self._avail
        for name, u in req.as_units().items():
            if a.get(name, 0) < u:
                return False
        return True

    def _check_no_instances(self, req: ResourceSet, verb: str) -> None:
        for name in req.as_units():
            if name in self._allocators:
                raise ValueError(
                    f"Request {req!r} names {name!r}, which is tracked per instance on this "
                    f"node; use allocate()/release(allocation) instead of {verb}()."
                )

    def try_acquire(self, request: Union[ResourceSet, Mapping[str, object]]) -> bool:
        """Take `request` if it fits now; False (and no change) otherwise."""
        req = _as_resource_set(request)
        self._check_no_instances(req, "try_acquire")
        if not self.can_fit(req):
            return False
        self._take(req)
        return True

    def _take(self, req: ResourceSet) -> None:
        a = self._avail
        for name, u in req.as_units().items():
            a[name] -= u
        self._avail_cache = None
        if self.on_change is not None:
            self.on_change()

    def allocate(self, request: Union[ResourceSet, Mapping[str, object]]) -> Optional[Allocation]:
        """Take `request` including device assignment; None if it can't fit now."""
        req = _as_resource_set(request)
        if not self.can_fit(req):
            return None
        units = req.as_units()
        picks: Dict[str, List[Hashable]] = {}
        for name, alloc in self._allocators.items():
            u = units.get(name, 0)
            if u:
                amount = u / UNIT_SCALE
                picked = alloc._pick(alloc._amount_units(amount))
                if picked is None:
                    return None
                picks[name] = picked
        instances: Dict[str, Tuple[Hashable, ...]] = {}
        for name, alloc in self._allocators.items():
            u = units.get(name, 0)
            if u:
                got = alloc.assign(u / UNIT_SCALE)
                assert got == picks[name]
                instances[name] = tuple(got)
        self._take(req)
        return Allocation(req, instances)

    def release(self, request: Union[Allocation, ResourceSet, Mapping[str, object]]) -> None:
        """Give back an `Allocation` (exactly once) or a plain scalar request."""
        if isinstance(request, Allocation):
            if request._released:
                raise ResourceAccountingError(f"{request!r} was already released.")
            req = request.resources
            self._check_release_fits(req)
            for name, ids in request.instances.items():
                self._allocators[name].release(ids, req.units(name) / UNIT_SCALE)
            self._give(req)
            request._released = True
            return
        req = _as_resource_set(request)
        self._check_no_instances(req, "release")
        self._check_release_fits(req)
        self._give(req)

    def _check_release_fits(self, req: ResourceSet) -> None:
        total = self._total.as_units()
        for name, u in req.as_units().items():
            if self._avail.get(name, 0) + u > total.get(name, 0):
                raise ResourceAccountingError(
                    f"Releasing {req!r} would raise {name!r} to "
                    f"{(self._avail.get(name, 0) + u) / UNIT_SCALE}, above the total "
                    f"{total.get(name, 0) / UNIT_SCALE}; released twice or never acquired?"
                )

    def _give(self, req: ResourceSet) -> None:
        a = self._avail
        for name, u in req.as_units().items():
            a[name] = a.get(name, 0) + u
        self._avail_cache = None
        if self.on_change is not None:
            self.on_change()

    def __repr__(self) -> str:
        return f"NodeResources(total={self._total!r}, available={self.available!r})"
