"""`multiprocessing.Pool` whose processes are meshray actors (`ray.util.multiprocessing`)."""
from multiprocessing import TimeoutError

from meshray.util.multiprocessing.pool import AsyncResult, IMapIterator, Pool

__all__ = ["Pool", "AsyncResult", "IMapIterator", "TimeoutError"]
