"""Stable result codes of the ledger state machine.

A member's number and name never change meaning: they are stored in idempotency records, replicated in
the log and exposed over HTTP. New codes get new numbers at the end. The HTTP layer maps them to status
codes in a single table (``raftledger.client.errors.STATUS``).
"""

from __future__ import annotations

from enum import IntEnum


class ResultCode(IntEnum):
    ok = 0
    invalid_command = 1
    account_not_found = 2
    account_closed = 3
    currency_mismatch = 4
    unbalanced = 5
    exceeds_credits = 6
    exceeds_debits = 7
    overflow = 8
    pending_not_found = 9
    pending_already_posted = 10
    pending_already_voided = 11
    pending_expired = 12
    amount_exceeds_pending = 13
    already_reversed = 14
    too_many_entries = 15
    too_few_entries = 16
    idempotency_key_reused = 17
    exists_with_different_fields = 18
    linked_event_failed = 19
    invalid_amount = 20
    invalid_id = 21
    invalid_currency = 22
    flags_conflict = 23
    transaction_not_pending = 24
    transaction_not_posted = 25
    partial_amount_not_allowed = 26
    transaction_not_found = 27
    invalid_timeout = 28
    invalid_metadata = 29
    accounts_must_be_different = 30
    wrong_shard = 31
    transaction_aborted = 32
    feed_offset_out_of_range = 33

    @property
    def is_ok(self) -> bool:
        return self is ResultCode.ok


MESSAGES: dict[ResultCode, str] = {
    ResultCode.ok: "ok",
    ResultCode.invalid_command: "the command is malformed",
    ResultCode.account_not_found: "an account in the transaction does not exist",
    ResultCode.account_closed: "an account in the transaction is closed",
    ResultCode.currency_mismatch: "an entry's currency differs from its account's currency",
    ResultCode.unbalanced: "debits and credits differ for a currency",
    ResultCode.exceeds_credits: "debits would exceed credits on an account that forbids it",
    ResultCode.exceeds_debits: "credits would exceed debits on an account that forbids it",
    ResultCode.overflow: "a balance would exceed 2**127",
    ResultCode.pending_not_found: "the pending transaction does not exist",
    ResultCode.pending_already_posted: "the pending transaction was already posted",
    ResultCode.pending_already_voided: "the pending transaction was already voided",
    ResultCode.pending_expired: "the pending transaction expired",
    ResultCode.amount_exceeds_pending: "the amount exceeds the pending amount",
    ResultCode.already_reversed: "the transaction was already reversed",
    ResultCode.too_many_entries: "a transaction has at most 128 entries",
    ResultCode.too_few_entries: "a transaction has at least 2 entries",
    ResultCode.idempotency_key_reused: "this id was used before with a different payload",
    ResultCode.exists_with_different_fields: "an account with this id exists with different fields",
    ResultCode.linked_event_failed: "another command of the atomic batch failed",
    ResultCode.invalid_amount: "amounts are integers with 0 < amount < 2**63",
    ResultCode.invalid_id: "ids are 1-128 chars of A-Z a-z 0-9 . _ : - { }",
    ResultCode.invalid_currency: "currencies match [A-Z0-9]{3,12}",
    ResultCode.flags_conflict: "debit and credit limits are mutually exclusive",
    ResultCode.transaction_not_pending: "the transaction is not a pending transaction",
    ResultCode.transaction_not_posted: "only posted transactions can be reversed",
    ResultCode.partial_amount_not_allowed: "a partial amount needs all hold entries to share one amount",
    ResultCode.transaction_not_found: "the transaction does not exist",
    ResultCode.invalid_timeout: "timeout_seconds needs pending=true and 0 <= timeout < 2**31",
    ResultCode.invalid_metadata: "metadata must be a JSON object of bounded size",
    ResultCode.accounts_must_be_different: "an account is on both the debit and the credit side",
    ResultCode.wrong_shard: "the command names an account whose slot another shard owns",
    ResultCode.transaction_aborted: "the cross-shard transaction did not complete in time and was rolled "
                                    "back; send it again with a new id",
    ResultCode.feed_offset_out_of_range: "a consumer's offset must be between the first event the shard "
                                         "still holds (minus one) and its last event",
}
