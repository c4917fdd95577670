"""The history of a run: every operation with its invoke and complete times, its process and its
outcome, as Jepsen records one.

Outcomes: ``ok`` (the ledger acknowledged it), ``fail`` (it surely did not happen: a rule refused it,
or the node said it was not carried out; ``code`` says why), ``info`` (indeterminate: a timeout, a
lost connection, ``outcome_unknown``; it may or may not have happened, and a checker must accept
either). Times are seconds since the run started (monotonic clock).
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

OK, FAIL, INFO = "ok", "fail", "info"
operations_max = 200_000  # a bound on one run's history (an hour at full speed stays well under it)


@dataclass
class Op:
    index: int
    process: str
    type: str  # "transfer" | "read"
    invoke: float
    complete: float | None = None
    outcome: str | None = None
    code: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Fault:
    kind: str
    target: str
    start: float
    end: float | None = None
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class History:
    """Thread-safe recorder of operations and fault windows."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.ops: list[Op] = []
        self.faults: list[Fault] = []
        self._lock = threading.Lock()

    def now(self) -> float:
        return time.monotonic() - self.started

    @property
    def full(self) -> bool:
        return len(self.ops) >= operations_max

    def invoke(self, process: str, type_: str, **fields: Any) -> Op:
        with self._lock:
            op = Op(len(self.ops), process, type_, self.now(), fields=dict(fields))
            self.ops.append(op)
            return op

    def complete(self, op: Op, outcome: str, code: str | None = None, **fields: Any) -> Op:
        op.complete, op.outcome, op.code = self.now(), outcome, code
        op.fields.update(fields)
        return op

    def fault_started(self, kind: str, target: str, note: str = "") -> Fault:
        with self._lock:
            fault = Fault(kind, target, self.now(), note=note)
            self.faults.append(fault)
            return fault

    def fault_ended(self, fault: Fault, note: str = "") -> None:
        fault.end = self.now()
        if note:
            fault.note = f"{fault.note}; {note}" if fault.note else note

    def to_json(self) -> dict[str, Any]:
        return {"ops": [o.to_json() for o in self.ops], "faults": [f.to_json() for f in self.faults]}
