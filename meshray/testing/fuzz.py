"""A fuzzer for meshray's wire protocol, run with a valid cluster token.

    python -m chaos fuzz-wire --seed 7 --cases 3000 --duration 60
    python -m chaos fuzz-wire --seed 7 --case 1234            # replay one case
    python -m chaos fuzz-wire --address HOST:PORT --token-file F [--actor ADDR --actor-id HEX]

The token gate (rpc/factory.py) keeps strangers out; this checks what a
*member* can do with bytes no correct process sends. For every method of
every service the targets serve (found from the generated descriptors and a
probe, so a new method is fuzzed without changes here) it sends random bytes,
truncated and mutated valid messages, fields with the wrong wire type,
unknown fields, huge length prefixes, valid messages with one field made
wrong (ids, counts, unknown "enum" strings, JSON, pickles that are no
pickle or the wrong pickle), unary calls with zero or two messages, unknown
methods, valid templates (controls) and templates with one field set at
random, and random well-typed messages (fuzz_cases.py, fuzz_semantic.py say
what each must be answered with). Every call has a deadline.

Two exchanges are not gRPC: an actor's calls come on call links
(rpc/call_link.py) and a process's session with its node on the node's
session link (rpc/session_link.py). For such a target (`Target.link`: the
method its link carries) each case's messages go as CALLS frames on a link,
then END, and the link's closing status is the answer (INVALID_ARGUMENT,
UNAVAILABLE, OK as on gRPC); "unknown method" cases do not apply to it.

fuzz_local.run_local starts a private cluster and an actor, fuzzes both, and
checks what must hold afterwards (see there).
"""
from __future__ import annotations

import collections
import os
import random
import time
from dataclasses import dataclass, field

import grpc

from meshray.rpc import call_link, make_channel
from meshray.rpc.session_link import SESSION_METHOD
from meshray.testing import fuzz_cases as fc
from meshray.testing.fuzz_semantic import semantic_case

__all__ = ["CaseMaker", "Report", "Target", "WireFuzzer", "judge"]

# Statuses that mean the server broke, rather than refused or answered.
BROKEN_CODES = frozenset({"UNKNOWN", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "CANCELLED"})
PROBE_TIMEOUT_S = 10.0


@dataclass
class Target:
    name: str                       # "node", "actor"
    addresses: list                 # TCP and unix addresses of the same server
    context: fc.Context
    pid: int = 0
    methods: list = field(default_factory=list)    # what it serves (probe)
    link: str = ""                  # served on a link carrying this method, not gRPC


_LINK_MAGIC = {call_link.CALL_METHOD: call_link.MAGIC, SESSION_METHOD: call_link.SESSION_MAGIC}


def judge(case: fc.Case, code: str, details: str, deadline_s: float) -> str | None:
    """Why the answer `code`/`details` to `case` is wrong, or None."""
    if code == "DEADLINE_EXCEEDED":
        return f"no answer within {deadline_s:.0f}s (a hang)"
    if case.expect == fc.INVALID:
        if code != "INVALID_ARGUMENT":
            return f"expected INVALID_ARGUMENT, got {code}: {details[:300]}"
        missing = [name for name in case.names if name not in details]
        if missing:
            return f"INVALID_ARGUMENT does not name {missing}: {details[:300]}"
    elif case.expect == fc.UNIMPLEMENTED:
        if code != "UNIMPLEMENTED":
            return f"expected UNIMPLEMENTED, got {code}: {details[:300]}"
    elif case.expect == fc.ACCEPTED:
        if code not in case.accepted_codes:
            return f"a valid request was not accepted ({code}): {details[:300]}"
    elif code in BROKEN_CODES:
        return f"{code} means the server broke: {details[:300]}"
    return None


class CaseMaker:
    """Draws case `index` from Random(f"{seed}:{index}") alone."""

    def __init__(self, seed: int, targets: list):
        self.seed = seed
        self.targets = [t for t in targets if t.methods]
        if not self.targets:
            raise ValueError("no target serves any meshray method (did the probe fail?)")
        self._all = fc.wire_methods()

    def make(self, index: int) -> fc.Case:
        rng = random.Random(f"{self.seed}:{index}")
        target = rng.choice(self.targets)
        method = rng.choice(target.methods)
        kind = rng.choices(list(fc.KINDS), weights=list(fc.KINDS.values()))[0]
        case = getattr(self, "_" + kind)(rng, target, method)
        if case is None:     # no template or semantic rules for this request type
            kind, case = "random_valid", self._random_valid(rng, target, method)
        case.index, case.kind, case.target = index, kind, target.name
        case.method = case.method or method.path
        return case

    # --------------------------------------------------------------- helpers
    def _base(self, rng, target, method):
        made = fc.template(method.request_class, rng, target.context) if rng.random() < 0.7 \
            else None
        if made is None:
            return fc.random_message(method.request_class, rng, target.context)
        return made[0]

    def _garbage_case(self, rng, method, data: bytes, note: str, names=()) -> fc.Case:
        """One message that should be wire garbage; if protobuf takes it after all, CLEAR."""
        full = method.request_class.DESCRIPTOR.full_name
        if fc.wire_garbage(method.request_class, data):
            return fc.Case(0, "", "", "", rng.choice(fc.SHAPES), [data], fc.INVALID,
                           (full, *names), note=note)
        return fc.Case(0, "", "", "", method.shape, [data], fc.CLEAR,
                       note=note + " (decodes cleanly after all)")

    # --------------------------------------------------------------- kinds
    def _template(self, rng, target, method):
        made = fc.template(method.request_class, rng, target.context)
        if made is None:
            return None
        message, codes = made
        messages = [message.SerializeToString()]
        if method.client_streaming:
            for _ in range(rng.randint(0, 2)):
                messages.append(fc.template(method.request_class, rng, target.context)[0]
                                .SerializeToString())
        return fc.Case(0, "", "", "", method.shape, messages, fc.ACCEPTED,
                       accepted_codes=codes, note="valid template")

    def _random_bytes(self, rng, target, method):
        size = rng.choice([rng.randint(1, 32), rng.randint(33, 600), rng.randint(1, 8)])
        if rng.random() < 0.02:
            size = rng.randint(64 * 1024, 1024 * 1024)
        data = os.urandom(size) if size > 4096 else fc._bytes(rng, size, size)
        return self._garbage_case(rng, method, data, f"{size} random bytes")

    def _truncated(self, rng, target, method):
        data = self._base(rng, target, method).SerializeToString()
        if len(data) < 2:
            return self._random_bytes(rng, target, method)
        cut = 1
        for _ in range(12):
            cut = rng.randrange(1, len(data))
            if fc.wire_garbage(method.request_class, data[:cut]):
                break
        return self._garbage_case(rng, method, data[:cut], f"cut to {cut} of {len(data)} bytes")

    def _mutated(self, rng, target, method):
        data = bytearray(self._base(rng, target, method).SerializeToString() or b"\0")
        edits = []
        for _ in range(rng.randint(1, 4)):
            if not data:
                data = bytearray(b"\0")
            at = rng.randrange(len(data))
            pick = rng.randrange(4)
            if pick == 0:
                data[at] ^= 1 << rng.randrange(8)
            elif pick == 1:
                data[at] = rng.getrandbits(8)
            elif pick == 2:
                data[at:at] = fc._bytes(rng, 1, 4)
            elif len(data) > 1:
                del data[at:at + rng.randint(1, 4)]
            edits.append(f"{('flip', 'set', 'insert', 'delete')[pick]}@{at}")
        return self._garbage_case(rng, method, bytes(data), "mutated " + ",".join(edits))

    def _injected(self, rng, target, method, known: bool):
        """A field number (known, with another wire type; or unknown) deep inside."""
        root = self._base(rng, target, method)
        holder = rng.choice(fc._submessages(root, []))
        fields = list(holder.DESCRIPTOR.fields)
        if known and fields:
            chosen = rng.choice(fields)
            number = chosen.number
            wire_type = rng.choice([w for w in (0, 1, 2, 5) if w != fc._declared_wire_type(chosen)])
            what = f"{holder.DESCRIPTOR.name}.{chosen.name} sent with wire type {wire_type}"
        else:
            used = {f.number for f in fields}
            number = rng.choice([max(used | {0}) + rng.randint(1, 50), rng.randint(1000, 9999),
                                 536870911])
            while number in used:
                number += 1
            wire_type = rng.choice((0, 1, 2, 5))
            what = f"unknown field {number} in {holder.DESCRIPTOR.name}"
        holder.MergeFromString(fc._field_bytes(number, wire_type, rng))
        return self._garbage_case(rng, method, root.SerializeToString(), what,
                                  names=(f"field number {number}",))

    def _wrong_wire_type(self, rng, target, method):
        return self._injected(rng, target, method, known=True)

    def _unknown_field(self, rng, target, method):
        return self._injected(rng, target, method, known=False)

    def _huge_length(self, rng, target, method):
        data = self._base(rng, target, method).SerializeToString()
        fields = [f for f in method.request_class.DESCRIPTOR.fields
                  if fc._declared_wire_type(f) == 2]
        number = rng.choice(fields).number if fields else rng.randint(1, 20)
        length = rng.choice([2 ** 31 - 1, 2 ** 32 + 5, 2 ** 62, 2 ** 64 - 1, len(data) + 100])
        data += fc._tag(number, 2) + fc._varint(length) + fc._bytes(rng, 0, 16)
        return self._garbage_case(rng, method, data, f"field {number} claims {length} bytes")

    def _shape(self, rng, target, method):
        made = fc.template(method.request_class, rng, target.context)
        base = made[0] if made else fc.random_message(method.request_class, rng, target.context)
        valid = base.SerializeToString()
        full = method.request_class.DESCRIPTOR.full_name
        side = "stream" if method.server_streaming else "unary"
        if not method.client_streaming:
            messages = [] if rng.random() < 0.5 else [valid, valid]
            # A random first message may be refused for itself before the second arrives.
            names = ("exactly one",) if made or not messages else (full,)
            return fc.Case(0, "", "", "", f"stream_{side}", messages, fc.INVALID, names,
                           note=f"unary request sent {len(messages)} messages")
        if rng.random() < 0.2:
            template = fc.template(method.request_class, rng, target.context)
            if template is not None:
                return fc.Case(0, "", "", "", method.shape, [], fc.ACCEPTED,
                               accepted_codes=("OK",), note="empty request stream")
        garbage = fc._bytes(rng, 1, 64)
        while not fc.wire_garbage(method.request_class, garbage):
            garbage = b"\xff" + garbage
        messages = [valid] * rng.randint(1, 3) + [garbage]
        return fc.Case(0, "", "", "", method.shape, messages, fc.INVALID, (full,),
                       note=f"garbage after {len(messages) - 1} valid messages")

    def _unknown_method(self, rng, target, method):
        if target.link:
            return None      # a link carries one kind of request: there is no other method
        served = {m.path for m in target.methods}
        foreign = [m.path for m in self._all if m.path not in served]
        name = method.path.rsplit("/", 1)[1]
        path = rng.choice([f"/{method.service}/NoSuch{name}", f"/{method.service}/{name.lower()}",
                           "/meshray.NoSuchService/Call", f"/{method.service}/",
                           "/" + "".join(chr(rng.randint(0x21, 0x7E)) for _ in range(12)),
                           *foreign])
        data = rng.choice([fc._bytes(rng, 0, 40), self._base(rng, target, method)
                           .SerializeToString()])
        return fc.Case(0, "", "", path, rng.choice(fc.SHAPES), [data], fc.UNIMPLEMENTED,
                       note=f"{path} is not served by {target.name}")

    def _random_valid(self, rng, target, method):
        message = fc.random_message(method.request_class, rng, target.context)
        return fc.Case(0, "", "", "", method.shape, [message.SerializeToString()], fc.CLEAR,
                       note="random well-typed message")

    def _field_tweak(self, rng, target, method):
        """A valid template with one field anywhere in it set to a random value."""
        made = fc.template(method.request_class, rng, target.context)
        if made is None:
            return None
        root = made[0]
        holder = rng.choice(fc._submessages(root, []))
        fields = [f for f in holder.DESCRIPTOR.fields
                  if (root.DESCRIPTOR.name, f.full_name) not in fc.WAITS_FOR_EVER]
        if not fields:
            return None
        chosen = rng.choice(fields)
        fc.set_random(holder, chosen, rng, target.context)
        return fc.Case(0, "", "", "", method.shape, [root.SerializeToString()], fc.CLEAR,
                       note=f"{holder.DESCRIPTOR.name}.{chosen.name} set at random")

    def _semantic(self, rng, target, method):
        made = semantic_case(method.request_class, rng, target.context)
        if made is None:
            return None
        message, names, note = made
        return fc.Case(0, "", "", "", method.shape, [message.SerializeToString()], fc.INVALID,
                       tuple(names), note=note)


@dataclass
class Report:
    seed: int
    cases: int = 0
    seconds: float = 0.0
    by_kind: collections.Counter = field(default_factory=collections.Counter)
    by_code: collections.Counter = field(default_factory=collections.Counter)
    by_expect: collections.Counter = field(default_factory=collections.Counter)
    answers: dict = field(default_factory=lambda: collections.defaultdict(collections.Counter))
    violations: list = field(default_factory=list)      # one line each
    checks: dict = field(default_factory=dict)          # health/leak figures

    @property
    def ok(self) -> bool:
        return not self.violations

    def summary(self) -> str:
        lines = [f"wire fuzz seed={self.seed}: {self.cases} cases in {self.seconds:.1f}s, "
                 f"{len(self.violations)} violation(s)",
                 f"  answers: {dict(sorted(self.by_code.items()))}"]
        for kind, codes in sorted(self.answers.items()):
            lines.append(f"    {kind}: {dict(sorted(codes.items()))}")
        for key, value in self.checks.items():
            lines.append(f"  {key}: {value}")
        lines.extend(f"  VIOLATION {v}" for v in self.violations[:50])
        if len(self.violations) > 50:
            lines.append(f"  ... and {len(self.violations) - 50} more")
        return "\n".join(lines)


def _invoke(channel, case: fc.Case, deadline_s: float) -> tuple:
    """(status code name, details) of sending `case` as raw bytes."""
    try:
        if case.shape == "unary_unary":
            channel.unary_unary(case.method, request_serializer=None,
                                response_deserializer=None)(case.messages[0], timeout=deadline_s)
        elif case.shape == "unary_stream":
            for _ in channel.unary_stream(case.method, request_serializer=None,
                                          response_deserializer=None)(case.messages[0],
                                                                      timeout=deadline_s):
                pass
        elif case.shape == "stream_unary":
            channel.stream_unary(case.method, request_serializer=None,
                                 response_deserializer=None)(iter(case.messages),
                                                             timeout=deadline_s)
        else:
            for _ in channel.stream_stream(case.method, request_serializer=None,
                                           response_deserializer=None)(iter(case.messages),
                                                                       timeout=deadline_s):
                pass
    except grpc.RpcError as exc:
        return exc.code().name, exc.details() or ""
    return "OK", ""


def _invoke_link(address: str, token: str | None, case: fc.Case, deadline_s: float,
                 method: str) -> tuple:
    """(status code name, details) of sending `case`'s messages on a link
    carrying `method`."""
    deadline = time.monotonic() + deadline_s
    try:
        link = call_link.connect(address, token=token, timeout=deadline_s,
                                 magic=_LINK_MAGIC[method])
    except call_link.LinkClosed as exc:
        return "UNAVAILABLE", exc.details
    try:
        link.set_timeout(deadline_s)
        try:
            for message in case.messages:
                link.send(call_link.CALLS, message)
            link.send(call_link.END)
        except call_link.LinkClosed:
            pass          # the actor ended the link early: its status says why
        while time.monotonic() < deadline:
            if link.recv_reply() is None:
                return "OK", ""
        return "DEADLINE_EXCEEDED", "no status on the link"
    except call_link.LinkClosed as exc:
        if "timed out" in exc.details:
            return "DEADLINE_EXCEEDED", exc.details
        return exc.code_name, exc.details      # the actor's status, or UNAVAILABLE for a break
    finally:
        link.close()


class WireFuzzer:
    def __init__(self, targets: list, token: str | None, seed: int, deadline_s: float = 10.0):
        self.targets = targets
        self.token = token
        self.seed = seed
        self.deadline_s = deadline_s
        self._channels = {}

    def channel(self, address: str):
        if address not in self._channels:
            self._channels[address] = make_channel(address, token=self.token)
        return self._channels[address]

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()

    def probe(self) -> None:
        """Find the services each target serves: a call to a service it does not
        serve is UNIMPLEMENTED, to one it serves anything else. The call carries
        one empty message to a unary method, none to a streaming one."""
        by_service = collections.defaultdict(list)
        for method in fc.wire_methods():
            by_service[method.service].append(method)
        for target in self.targets:
            target.methods = []
            if target.link:
                probe = fc.Case(-1, "probe", target.name, target.link, "stream_stream",
                                [], fc.CLEAR)
                code, details = _invoke_link(target.addresses[0], self.token, probe,
                                             PROBE_TIMEOUT_S, target.link)
                if code != "OK":
                    raise RuntimeError(f"probing the link of {target.name} "
                                       f"({target.addresses[0]}) failed: {code} {details}")
                target.methods = [m for m in fc.wire_methods() if m.path == target.link]
                continue
            for service, methods in sorted(by_service.items()):
                first = methods[0]
                probe = fc.Case(-1, "probe", target.name, first.path, "stream_stream",
                                [] if first.client_streaming else [b""], fc.CLEAR)
                code, details = _invoke(self.channel(target.addresses[0]), probe, PROBE_TIMEOUT_S)
                if code == "UNIMPLEMENTED":
                    continue
                if code in BROKEN_CODES or code == "DEADLINE_EXCEEDED":
                    raise RuntimeError(f"probing {service} on {target.name} "
                                       f"({target.addresses[0]}) failed: {code} {details}")
                target.methods.extend(methods)

    def run_case(self, case: fc.Case, address: str | None = None) -> tuple:
        """(code, details, seconds); the address, when not given, is drawn from the case."""
        target = next(t for t in self.targets if t.name == case.target)
        if address is None:
            address = random.Random(f"{self.seed}:{case.index}:address").choice(target.addresses)
        started = time.monotonic()
        if target.link:
            code, details = _invoke_link(address, self.token, case, self.deadline_s, target.link)
        else:
            code, details = _invoke(self.channel(address), case, self.deadline_s)
        return code, details, time.monotonic() - started

    def run(self, cases: int, seconds: float, *, first: int = 0, report: Report | None = None,
            on_violation=None, on_case=None) -> Report:
        report = report or Report(self.seed)
        maker = CaseMaker(self.seed, self.targets)
        started = time.monotonic()
        for index in range(first, first + cases):
            if time.monotonic() - started > seconds:
                break
            case = maker.make(index)
            code, details, _took = self.run_case(case)
            if on_case is not None:
                on_case(case, code, details)
            report.cases += 1
            report.by_kind[case.kind] += 1
            report.by_code[code] += 1
            report.by_expect[case.expect] += 1
            report.answers[case.kind][code] += 1
            problem = judge(case, code, details, self.deadline_s)
            if problem is not None:
                line = f"{case.describe()} -> {problem}"
                report.violations.append(line)
                if on_violation is not None:
                    on_violation(line)
        report.seconds += time.monotonic() - started
        return report
