"""Ray-compatible exceptions: hierarchy, messages, dual classes, pickling."""
import pickle

import cloudpickle
import pytest

from meshray import exceptions as E
from meshray.exceptions import RayTaskError


def roundtrip(obj):
    return pickle.loads(cloudpickle.dumps(obj))


def raise_and_wrap(exc, name="my_task", **kw):
    try:
        raise exc
    except BaseException as e:  # noqa: BLE001
        return RayTaskError.from_exception(e, name, **kw)


class OddInit(Exception):
    """__init__ takes different arguments than it passes to Exception."""

    def __init__(self, code, *, detail):
        super().__init__(f"code={code}")
        self.code = code
        self.detail = detail


class Final(Exception):
    """Refuses subclassing, so no dual class can be made."""

    def __init_subclass__(cls, **kwargs):
        raise TypeError("Final cannot be subclassed")


class MyOSError(OSError):
    pass


def test_hierarchy_matches_ray():
    assert issubclass(E.RayTaskError, E.RayError)
    assert issubclass(E.RayError, Exception)
    assert issubclass(E.ActorDiedError, E.RayActorError)
    assert issubclass(E.ActorUnavailableError, E.RayActorError)
    assert issubclass(E.OwnerDiedError, E.ObjectLostError)
    assert issubclass(E.ObjectFetchTimedOutError, E.ObjectLostError)
    assert issubclass(E.ObjectReconstructionFailedError, E.ObjectLostError)
    assert issubclass(E.ObjectReconstructionFailedMaxAttemptsExceededError, E.ObjectLostError)
    assert issubclass(E.ObjectReconstructionFailedLineageEvictedError, E.ObjectLostError)
    assert issubclass(E.ReferenceCountingAssertionError, AssertionError)
    assert issubclass(E.GetTimeoutError, TimeoutError) and issubclass(E.GetTimeoutError, E.RayError)
    assert issubclass(E.RayChannelTimeoutError, TimeoutError)
    assert issubclass(E.RayChannelError, E.RaySystemError)
    assert issubclass(E.ActorAlreadyExistsError, ValueError)
    for cls in E.RAY_EXCEPTION_TYPES:
        assert issubclass(cls, E.RayError)
    for name in E.__all__:
        assert hasattr(E, name), name


def test_dual_class_caught_as_both():
    err = raise_and_wrap(ValueError("bad value"), task_id=b"\x01\x02")
    dual = err.as_instanceof_cause()
    assert isinstance(dual, ValueError) and isinstance(dual, RayTaskError)
    assert type(dual).__name__ == "RayTaskError(ValueError)"
    with pytest.raises(ValueError):
        raise dual
    with pytest.raises(RayTaskError):
        raise dual
    msg = str(dual)
    assert "ValueError: bad value" in msg
    assert "Traceback" not in msg  # the header replaces it
    assert "my_task" in msg and "task_id=0102" in msg and "pid=" in msg
    assert dual.cause.args == ("bad value",)
    assert dual.function_name == "my_task"
    # Same class for the same cause type (stable `type(e)` comparisons).
    assert type(raise_and_wrap(ValueError("x")).as_instanceof_cause()) is type(dual)


def test_odd_init_cause_attributes_and_pickle():
    err = raise_and_wrap(OddInit(7, detail="d"))
    dual = err.as_instanceof_cause()
    assert isinstance(dual, OddInit)
    assert dual.code == 7 and dual.detail == "d"  # delegated to the cause
    back = roundtrip(dual)
    assert type(back) is type(dual)
    assert isinstance(back, OddInit) and back.code == 7 and back.detail == "d"
    assert str(back) == str(dual)
    plain = roundtrip(err)
    assert type(plain) is RayTaskError and plain.cause.detail == "d"
    assert pickle.loads(pickle.dumps(err)).cause.code == 7


def test_cause_chain_in_message():
    try:
        try:
            raise KeyError("inner")
        except KeyError as inner:
            raise RuntimeError("outer") from inner
    except RuntimeError as e:
        err = RayTaskError.from_exception(e, "f")
    msg = str(err)
    assert "KeyError: 'inner'" in msg and "RuntimeError: outer" in msg
    assert "direct cause" in msg


def test_uncombinable_cause_falls_back_to_self():
    err = raise_and_wrap(Final("f"))
    assert err.as_instanceof_cause() is err
    assert isinstance(err.cause, Final)


class NeedsNew(Exception):
    def __new__(cls, required):
        return super().__new__(cls, required)


def test_cause_with_demanding_new_falls_back_to_self():
    err = raise_and_wrap(NeedsNew("r"))
    assert err.as_instanceof_cause() is err


def test_os_error_subclass_dual_keeps_errno():
    err = raise_and_wrap(MyOSError(2, "No such file", "/x"))
    dual = err.as_instanceof_cause()
    assert isinstance(dual, MyOSError) and isinstance(dual, OSError) and isinstance(dual, RayTaskError)
    assert dual.errno == 2 and dual.filename == "/x"
    assert "No such file" in str(dual)
    back = roundtrip(dual)
    assert type(back) is type(dual) and back.errno == 2


def test_cause_already_satisfied_returns_self():
    err = raise_and_wrap(Exception("plain"))
    assert err.as_instanceof_cause() is err
    assert RayTaskError("f", "", None).as_instanceof_cause() is not None


def test_nested_task_error_keeps_user_class():
    inner = raise_and_wrap(ZeroDivisionError("div"), name="inner").as_instanceof_cause()
    outer = raise_and_wrap(inner, name="outer")
    dual = outer.as_instanceof_cause()
    assert isinstance(dual, ZeroDivisionError) and isinstance(dual, RayTaskError)
    assert "outer" in str(dual)
    assert type(roundtrip(dual)) is type(dual)


def test_ray_error_cause_becomes_catchable():
    err = raise_and_wrap(E.ActorDiedError(actor_id="aa"))
    dual = err.as_instanceof_cause()
    assert isinstance(dual, E.ActorDiedError) and isinstance(dual, RayTaskError)
    assert dual.actor_init_failed is False


def test_unpicklable_cause_is_replaced():
    class Holder(Exception):
        pass

    exc = Holder("x")
    exc.lock = __import__("threading").Lock()
    err = raise_and_wrap(exc)
    assert type(err.cause) is E.RayError
    assert "isn't serializable" in str(err.cause)
    roundtrip(err)


def test_empty_traceback_still_informative():
    err = RayTaskError("fn", None, ValueError("v"), pid=5, ip="1.2.3.4", actor_id=b"\xab", actor_repr="A()")
    msg = str(err)
    assert "pid=5" in msg and "ip=1.2.3.4" in msg and "actor_id=ab" in msg and "repr=A()" in msg
    assert "ValueError: v" in msg


def test_internal_frames_hidden():
    tb = (
        "Traceback (most recent call last):\n"
        '  File "/x/meshray/core/executor.py", line 10, in run\n'
        "    result = fn()\n"
        '  File "/home/u/app.py", line 3, in fn\n'
        "    raise ValueError('v')\n"
        "ValueError: v\n"
    )
    msg = str(RayTaskError("fn", tb, ValueError("v"), pid=1, ip="h"))
    assert "executor.py" not in msg and "result = fn()" not in msg
    assert "app.py" in msg and "raise ValueError('v')" in msg


ALL_INSTANCES = [
    E.RayError("x"),
    E.CrossLanguageError("boom", "JAVA"),
    E.TaskCancelledError(b"\x01"),
    E.TaskCancelledError(),
    E.LocalRayletDiedError(node_id=b"\x02"),
    E.WorkerCrashedError(task_id="t1", worker_id="w1", node_id="n1"),
    E.RayActorError("a1"),
    E.ActorDiedError(actor_id="a1", class_name="C", name="n", namespace="ns", pid=3, ip="h",
                     node_id="n1", error_message="killed", never_started=True),
    E.ActorUnavailableError("restarting", b"\xaa"),
    E.ActorUnavailableError("refused", b"\xaa", delivered=False),
    E.ActorAlreadyExistsError("svc", "ns", actor_id="a9"),
    E.RaySystemError("daemon gone", "tb"),
    E.UserCodeException("u"),
    E.ObjectStoreFullError("full"),
    E.OutOfDiskError("disk"),
    E.OutOfMemoryError("oom", task_id="t", node_id="n"),
    E.NodeDiedError("dead", node_id="n"),
    E.ObjectLostError("o1", "10.0.0.1:5000", "f.py:3"),
    E.ObjectFetchTimedOutError("o1", None, None),
    E.RpcError("unavailable", 14),
    E.ReferenceCountingAssertionError("o1"),
    E.ObjectFreedError("o1"),
    E.OwnerDiedError("o1", "10.0.0.1:5000"),
    E.ObjectReconstructionFailedError("o1"),
    E.ObjectReconstructionFailedMaxAttemptsExceededError("o1"),
    E.ObjectReconstructionFailedLineageEvictedError("o1"),
    E.GetTimeoutError("Get timed out after 1s"),
    E.PlasmaObjectNotAvailable(),
    E.AsyncioActorExit(),
    E.RuntimeEnvSetupError("pip failed"),
    E.TaskPlacementGroupRemoved(),
    E.ActorPlacementGroupRemoved(),
    E.PendingCallsLimitExceeded("too many"),
    E.TaskUnschedulableError("node dead", task_id="t"),
    E.ActorUnschedulableError("node dead", actor_id="a"),
    E.PlacementGroupSchedulingError("no room", placement_group_id="p"),
    E.ObjectRefStreamEndOfStreamError(),
    E.OufOfBandObjectRefSerializationException("oob"),
    E.RayChannelError("chan"),
    E.RayChannelTimeoutError("chan timeout"),
]


@pytest.mark.parametrize("exc", ALL_INSTANCES, ids=lambda e: type(e).__name__)
def test_every_error_pickles_with_message(exc):
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is type(exc)
    assert str(back) == str(exc)
    assert back.__dict__ == exc.__dict__
    assert E.RayError.from_bytes(exc.to_bytes()).__class__ is type(exc)


def test_messages_name_ids():
    assert "t1" in str(E.WorkerCrashedError(task_id="t1"))
    assert "0a0b" in str(E.TaskCancelledError(b"\x0a\x0b"))
    s = str(E.ActorDiedError(actor_id=b"\xaa", class_name="C", pid=3, node_id="n1", error_message="killed"))
    assert "actor_id: aa" in s and "class_name: C" in s and "node_id: n1" in s and "killed" in s
    assert "aa" in str(E.ActorUnavailableError("restarting", b"\xaa"))
    s = str(E.OwnerDiedError("o1", "10.0.0.1:5000"))
    assert "o1" in s and "10.0.0.1:5000" in s and "owner" in s
    assert "max_retries" in str(E.ObjectReconstructionFailedMaxAttemptsExceededError("o1"))
    assert str(E.TaskUnschedulableError("x", task_id="t")).startswith("The task (task t) is not schedulable")
    assert "svc" in str(E.ActorAlreadyExistsError("svc"))


def test_actor_died_from_task_error():
    init_err = raise_and_wrap(RuntimeError("init boom"), name="A.__init__", actor_id=b"\x0f")
    died = E.ActorDiedError.from_task_error(init_err)
    assert died.actor_init_failed and died.actor_id == "0f"
    assert "init boom" in str(died) and "creation task" in str(died)
    assert isinstance(E.RayActorError.from_task_error(init_err), E.ActorDiedError)
    assert roundtrip(died).cause.function_name == "A.__init__"


def test_actor_already_exists_caught_as_value_error():
    with pytest.raises(ValueError, match="already taken"):
        raise E.ActorAlreadyExistsError("svc", "default")


def test_get_timeout_is_timeout_error():
    with pytest.raises(TimeoutError):
        raise E.GetTimeoutError("timed out")


def test_ray_task_error_positional_signature_like_ray():
    err = RayTaskError("f", "tb", ValueError("v"), "title", 42, "1.1.1.1", "A()", "aa")
    assert (err.proctitle, err.pid, err.ip, err.actor_repr, err.actor_id) == ("title", 42, "1.1.1.1", "A()", "aa")
    assert err.args[:2] == ("f", "tb")


def _refuse_to_load():
    raise RuntimeError("cannot be rebuilt here")


class FailsOnLoad(Exception):
    """Pickles fine, but rebuilding it raises: the receiver could not get it."""

    def __reduce__(self):
        return (_refuse_to_load, ())


def test_serialize_error_replaces_an_error_the_receiver_cannot_rebuild():
    from meshray.core.serialization import serialize_error
    err = raise_and_wrap(FailsOnLoad("payload 7"), name="loader")
    back = pickle.loads(serialize_error(err))
    assert type(back) is RayTaskError
    assert back.function_name == "loader"
    assert "FailsOnLoad" in str(back.cause) and "payload 7" in str(back.cause)
    assert "cannot be rebuilt here" in str(back.cause)
    assert "FailsOnLoad: payload 7" in back.traceback_str


def test_serialize_error_keeps_locally_defined_classes_by_value():
    from meshray.core.serialization import serialize_error

    class Local(Exception):
        pass

    back = pickle.loads(serialize_error(raise_and_wrap(Local("here"))))
    assert type(back.cause).__name__ == "Local" and str(back.cause) == "here"
