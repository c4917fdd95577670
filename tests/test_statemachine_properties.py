"""Random command streams against the real LMDB state machine, checking the invariants after every step."""

from __future__ import annotations

import ast
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from raftledger.statemachine.audit import verify_store
from raftledger.statemachine.codec import (
    Invalid,
    decode_command,
    decode_requests,
    encode_command,
    encode_requests,
)
from raftledger.statemachine.codes import ResultCode as C
from raftledger.statemachine.commands import (
    AccountFlag,
    Batch,
    Command,
    CreateAccount,
    CreateTransaction,
    Direction,
    EntrySpec,
    ExpireHolds,
    PostPending,
    Request,
    ReverseTransaction,
    VoidPending,
)
from raftledger.statemachine.records import Result
from raftledger.statemachine.store import LedgerStore
from raftledger.statemachine.testing import Harness

ACCOUNTS = [f"acct{i}" for i in range(6)]
FLAG_CHOICES = [0, int(AccountFlag.debits_must_not_exceed_credits),
                int(AccountFlag.credits_must_not_exceed_debits), int(AccountFlag.history)]
amounts = st.one_of(st.integers(1, 1_000), st.integers(1, 1_000), st.integers(1, 2**63 - 1))
LIMIT_D = int(AccountFlag.debits_must_not_exceed_credits)
LIMIT_C = int(AccountFlag.credits_must_not_exceed_debits)
HISTORY = int(AccountFlag.history)
# A small chart of accounts: unlimited sources and sinks, limited customers, history, one in USD.
CHART = [("acct0", Direction.debit, 0, "BRL"), ("acct1", Direction.credit, 0, "BRL"),
         ("acct2", Direction.credit, LIMIT_D | HISTORY, "BRL"), ("acct3", Direction.debit, LIMIT_C, "BRL"),
         ("acct4", Direction.credit, HISTORY, "BRL"), ("acct5", Direction.credit, 0, "USD")]


def _as_created(result: Result) -> tuple[object, ...]:
    return (result.code, result.record)


class LedgerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp()
        self.store = LedgerStore(f"{self.dir}/s.lmdb", map_size=2**28)
        self.ledger = Harness(self.store)
        self.first: dict[str, tuple[Command, tuple[object, ...]]] = {}
        self.holds: list[str] = []
        self.posted: list[str] = []
        self.counter = 0

    @initialize()
    def open_accounts(self) -> None:
        for account_id, normal, flags, currency in CHART:
            assert self.ledger.one(CreateAccount(account_id, currency, normal, flags)).ok

    def _next_id(self) -> str:
        self.counter += 1
        return f"tx{self.counter}"

    def _run(self, command: Command) -> Result:
        result = self.ledger.one(command)
        txid = command.id
        if result.code is C.accounts_must_be_different:
            # Refused on its shape, like a malformed command: nothing is stored under the id.
            with self.store.reader() as r:
                assert r.transaction(txid) is None
            return result
        if txid not in self.first and not isinstance(command, CreateAccount):
            self.first[txid] = (command, _as_created(result))
        return result

    @rule(account=st.sampled_from(ACCOUNTS + ["new1", "new2"]), flags=st.sampled_from(FLAG_CHOICES),
          normal=st.sampled_from(list(Direction)), currency=st.sampled_from(["BRL", "USD"]))
    def create_account(self, account: str, flags: int, normal: Direction, currency: str) -> None:
        self._run(CreateAccount(account, currency, normal, flags))

    @rule(debit=st.sampled_from(ACCOUNTS), credit=st.sampled_from(ACCOUNTS), amount=amounts,
          pending=st.booleans(), timeout=st.sampled_from([0, 0, 1, 5]))
    def transfer(self, debit: str, credit: str, amount: int, pending: bool, timeout: int) -> None:
        entries = (EntrySpec(debit, Direction.debit, amount, "BRL"),
                   EntrySpec(credit, Direction.credit, amount, "BRL"))
        cmd = CreateTransaction(self._next_id(), entries, pending, timeout if pending else 0)
        if self._run(cmd).ok:
            (self.holds if pending else self.posted).append(cmd.id)

    @rule(n=st.integers(2, 5), amount=st.integers(1, 500), data=st.data())
    def multi_entry(self, n: int, amount: int, data: st.DataObject) -> None:
        debits = [data.draw(st.sampled_from(ACCOUNTS)) for _ in range(n)]
        credit = data.draw(st.sampled_from(ACCOUNTS))
        entries = tuple(EntrySpec(a, Direction.debit, amount, "BRL") for a in debits) + (
            EntrySpec(credit, Direction.credit, amount * n, "BRL"),)
        self._run(CreateTransaction(self._next_id(), entries))

    @precondition(lambda self: self.holds)
    @rule(data=st.data(), partial=st.one_of(st.none(), st.integers(1, 2_000)))
    def post(self, data: st.DataObject, partial: int | None) -> None:
        hold = data.draw(st.sampled_from(self.holds))
        cmd = PostPending(self._next_id(), hold, partial)
        if self._run(cmd).ok:
            self.posted.append(cmd.id)

    @precondition(lambda self: self.holds)
    @rule(data=st.data())
    def void(self, data: st.DataObject) -> None:
        self._run(VoidPending(self._next_id(), data.draw(st.sampled_from(self.holds))))

    @precondition(lambda self: self.posted)
    @rule(data=st.data())
    def reverse(self, data: st.DataObject) -> None:
        cmd = ReverseTransaction(self._next_id(), data.draw(st.sampled_from(self.posted)))
        if self._run(cmd).ok:
            self.posted.append(cmd.id)

    @rule()
    def empty_entry(self) -> None:
        assert self.ledger.apply() == []

    @rule(seconds=st.integers(1, 4))
    def advance_and_touch(self, seconds: int) -> None:
        self.ledger.advance(seconds)
        self._run(CreateAccount("clock", "BRL"))

    @rule(seconds=st.integers(0, 4))
    def advance_and_expire_holds(self, seconds: int) -> None:
        self.ledger.advance(seconds)
        before = self.store.last_timestamp()
        result = self.ledger.one(ExpireHolds())
        assert (result.code, result.id, result.record) == (C.ok, "", None)
        with self.store.reader() as r:
            after = r.earliest_hold_deadline()
        assert self.store.last_timestamp() > before
        assert after is None or after > self.store.last_timestamp()  # every hold due is gone

    @precondition(lambda self: self.first)
    @rule(data=st.data())
    def retry(self, data: st.DataObject) -> None:
        txid = data.draw(st.sampled_from(sorted(self.first)))
        command, first = self.first[txid]
        again = self.ledger.one(command)
        assert _as_created(again) == first, (txid, again, first)
        assert again.replayed

    @precondition(lambda self: self.first)
    @rule(data=st.data())
    def reuse_id_with_other_payload(self, data: st.DataObject) -> None:
        txid = data.draw(st.sampled_from(sorted(self.first)))
        entries = (EntrySpec("acct0", Direction.debit, 999_999, "USD"),
                   EntrySpec("acct1", Direction.credit, 999_999, "USD"))
        assert self.ledger.one(CreateTransaction(txid, entries)).code is C.idempotency_key_reused

    @precondition(lambda self: self.posted)
    @rule(data=st.data())
    def atomic_batch_with_a_failure_leaves_no_trace(self, data: st.DataObject) -> None:
        before = self.store.fingerprint()[1]
        with self.store.reader() as r:
            snapshot = [r.account(a) for a in ACCOUNTS]
        ok_cmd = CreateTransaction("atomic-ok", (EntrySpec("acct0", Direction.debit, 1, "BRL"),
                                                EntrySpec("acct1", Direction.credit, 1, "BRL")))
        bad = CreateTransaction("atomic-bad", (EntrySpec("acct0", Direction.debit, 1, "BRL"),
                                              EntrySpec("ghost", Direction.credit, 1, "BRL")))
        results = self.ledger.batch(Batch((ok_cmd, bad), atomic=True))
        assert not all(r.ok for r in results)
        with self.store.reader() as r:
            assert [r.account(a) for a in ACCOUNTS] == snapshot
            assert r.transaction("atomic-ok") is None
        assert self.store.fingerprint()[1] != before  # the entry itself is applied

    @invariant()
    def ledger_invariants_hold(self) -> None:
        with self.store.reader() as r:
            assert verify_store(r) == []

    def teardown(self) -> None:
        """A replica replaying the log reaches the same state; it forgets its decoded account rows
        before every entry, so the store's row cache is shown to change nothing."""
        replica = LedgerStore(f"{self.dir}/replica.lmdb", map_size=2**28)
        for index, payload in self.ledger.log:
            replica._rows.clear()
            replica.apply_entry(index, payload)
        try:
            assert replica.fingerprint() == self.store.fingerprint()
            with replica.reader() as a, self.store.reader() as b:
                assert a.payload_digest() == b.payload_digest()
                assert [a.account(x) for x in ACCOUNTS] == [b.account(x) for x in ACCOUNTS]
        finally:
            replica.close()
            self.store.close()
            shutil.rmtree(self.dir, ignore_errors=True)


LedgerMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=50, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestLedgerMachine = LedgerMachine.TestCase


# ---- codec ---------------------------------------------------------------------------------------

ids = st.from_regex(r"[A-Za-z0-9._:\-]{1,20}", fullmatch=True)
json_values = st.recursive(st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=8)
metadata = st.dictionaries(st.text(max_size=5), json_values, max_size=3)
entry_specs = st.builds(EntrySpec, ids, st.sampled_from(list(Direction)), amounts,
                        st.sampled_from(["BRL", "USD"]))
commands = st.one_of(
    st.builds(CreateAccount, ids, st.sampled_from(["BRL", "EUR"]), st.sampled_from(list(Direction)),
              st.integers(0, 15), metadata),
    st.builds(CreateTransaction, ids, st.lists(entry_specs, max_size=4).map(tuple), st.booleans(),
              st.integers(0, 100), ids, metadata),
    st.builds(PostPending, ids, ids, st.one_of(st.none(), amounts)),
    st.builds(VoidPending, ids, ids),
    st.builds(ReverseTransaction, ids, ids),
)
any_commands = st.one_of(commands, st.builds(Batch, st.lists(commands, max_size=4).map(tuple),
                                             st.booleans()), st.just(ExpireHolds()))


@given(any_commands)
def test_every_command_survives_a_codec_round_trip(command: Command) -> None:
    assert decode_command(encode_command(command)) == command


@given(st.lists(st.tuples(st.integers(0, 2**64 - 1), any_commands), max_size=5))
def test_entries_survive_a_codec_round_trip(items: list[tuple[int, Command]]) -> None:
    payload = encode_requests([Request(ts, c) for ts, c in items])
    assert decode_requests(payload) == items


@given(st.binary(max_size=64))
def test_garbage_decodes_without_raising(data: bytes) -> None:
    decoded = decode_command(b"\x01" + data)
    assert isinstance(decoded, Invalid | Batch | CreateAccount | CreateTransaction | PostPending
                      | VoidPending | ReverseTransaction | ExpireHolds)


def test_command_of_wrong_shape_decodes_to_invalid() -> None:
    import msgpack

    wrong = b"\x01" + msgpack.packb([2, "t", [["a", 0, 1.5, "BRL"]], False, 0, "", {}])
    assert isinstance(decode_command(wrong), Invalid)
    assert isinstance(decode_command(b"\x07" + msgpack.packb([1])), Invalid)


def test_expire_holds_survives_a_codec_round_trip_alone_and_in_an_entry() -> None:
    assert decode_command(encode_command(ExpireHolds())) == ExpireHolds()
    payload = encode_requests([Request(5, ExpireHolds()), Request(6, VoidPending("v", "h"))])
    assert decode_requests(payload) == [(5, ExpireHolds()), (6, VoidPending("v", "h"))]


def test_expire_holds_decodes_only_on_its_own_never_inside_a_batch(ledger: Harness) -> None:
    import msgpack

    assert decode_command(b"\x01" + msgpack.packb([7])) == ExpireHolds()
    for wrong in ([7, 0], [7.0], [True], [6, False, [[7]]], [6, True, [[2, "t", [], False, 0, "", {}], [7]]]):
        assert isinstance(decode_command(b"\x01" + msgpack.packb(wrong)), Invalid), wrong
    in_batch = [[1, [6, False, [[7]]]]]
    outcome = ledger.store.apply_entry(ledger.index + 1, b"\x01" + msgpack.packb(in_batch))
    assert outcome is not None and [o.code for o in outcome] == [C.invalid_command]  # type: ignore[union-attr]


# ---- purity --------------------------------------------------------------------------------------

FORBIDDEN = {"time", "datetime", "random", "secrets", "uuid", "threading", "multiprocessing",
             "socket", "asyncio", "pysyncobj", "os", "select", "selectors", "subprocess", "logging"}


def test_statemachine_imports_no_clock_randomness_threads_sockets_or_raft() -> None:
    package = Path(__import__("raftledger.statemachine").statemachine.__file__).parent
    offenders = []
    for path in sorted(package.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert offenders == []
