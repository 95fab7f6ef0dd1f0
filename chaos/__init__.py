"""Chaos testing for meshray: workloads, nemeses (faults), checkers.

A run starts a cluster (or targets one), drives workloads that record every
operation in a history, injects faults on a schedule drawn from a seed, and
then checks the history against meshray's guarantees. See docs/chaos.md and
`python -m chaos list`.
"""
from chaos.checkers import CHECKERS, Verdict, run_checkers
from chaos.cli import RunConfig, RunResult, run_chaos
from chaos.history import History, Op
from chaos.nemeses import NEMESES, Fault, make_schedule
from chaos.workloads import WORKLOADS

__all__ = ["CHECKERS", "NEMESES", "WORKLOADS", "Fault", "History", "Op", "RunConfig",
           "RunResult", "Verdict", "make_schedule", "run_chaos", "run_checkers"]
