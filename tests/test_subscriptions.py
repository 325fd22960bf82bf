"""Subscription messages from SQS (SNS envelope, raw SNS, EventBridge) become notices, and notices fold
into one state per subscriber whatever order and how many times SQS delivers them."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from lifecycle_messages import (
    AGREEMENT_ID,
    AT,
    OFFER_ID,
    PRODUCT_ID,
    eventbridge_event,
    license_arn_of,
    sns_inner,
    sns_message,
)

from sidecar.subscriptions import (
    Change,
    Notice,
    Subscription,
    SubscriptionState,
    UnparseableMessage,
    apply,
    parse_message,
    parse_rfc3339,
    subscriber_of,
)

ACCOUNT = "845735284135"  # the docs' example acceptor
SUBSCRIBER = f"account:{ACCOUNT}"

# The docs' License Deprovisioned example, verbatim but for the seller-account placeholder: the licence
# "ARN" really lacks its "arn:" prefix there, and the offer id has no "offer-".
DOCS_LICENSE_DEPROVISIONED = """{
  "version": "0",
  "id": "12345678-1234-1234-1234-123456789012",
  "detail-type": "License Deprovisioned - Manufacturer",
  "source": "aws.agreement-marketplace",
  "account": "111122223333",
  "time": "2024-08-30T21:36:03Z",
  "region": "us-east-1",
  "resources": [
    "arn:aws:aws-marketplace::aws:agreement:agmt-4mwg1nevbokzw95eca5797ixs"
  ],
  "detail": {
    "requestId": "3d4c9f9b-b809-4f5e-9fac-a9ae98b05cbb",
    "catalog": "AWSMarketplace",
    "agreement": {
      "id": "agmt-4mwg1nevbokzw95eca5797ixs"
    },
    "product": {
      "code": "aw4fgf5tyo5w2ap6fEXAMPLE",
      "id": "prod-qtwveEXAMPLE"
    },
    "license": {
      "arn": "aws:license-manager:us-east-1:123456789012:l-e52ca6f38bf84d0fafb8802ca15ac11x"
    },
    "acceptor": {
      "accountId": "845735284135"
    },
    "proposer": {
      "accountId": "123456512334"
    },
    "offer": {
      "id": "8kkr91jo647j3qxlcjhlqce7y"
    }
  }
}"""

# The SNS page's example, verbatim: note the space before the identifier.
DOCS_SNS_INNER = """{
    "action": "subscribe-success",
    "customer-identifier": " X01EXAMPLEX",
    "product-code": "n0123EXAMPLEXXXXXXXXXXXX",
    "offer-identifier": "offer-abcexample123",
    "isFreeTrialTermPresent":"true"
}"""

SNS_CHANGES = [("subscribe-success", Change.SUBSCRIBED), ("subscribe-fail", Change.FAILED),
               ("unsubscribe-pending", Change.END_BEGAN), ("unsubscribe-success", Change.ENDED),
               ("entitlement-updated", Change.NOTICE)]
EVENT_CHANGES = [("Purchase Agreement Created", Change.SUBSCRIBED), ("Purchase Agreement Ended", Change.END_BEGAN),
                 ("License Deprovisioned", Change.ENDED), ("License Updated", Change.NOTICE),
                 ("Purchase Agreement Amended", Change.NOTICE), ("Purchase Agreement Ending", Change.NOTICE),
                 ("Purchase Agreement Advisory Issued", Change.NOTICE),
                 ("Purchase Agreement Advisory Resolved", Change.NOTICE),
                 ("Purchase Agreement Renewal Terms Finalized", Change.NOTICE),
                 ("Purchase Agreement Renewal Upcoming", Change.NOTICE)]


def fold(notices: list[Notice]) -> Subscription | None:
    """Apply notices in order, as a consumer does: None from `apply` means nothing changed."""
    sub: Subscription | None = None
    for n in notices:
        new = apply(sub, n)
        sub = sub if new is None else new
    return sub


def notice(change: Change, at: int, *, subscriber: str = SUBSCRIBER) -> Notice:
    """A notice with only what `apply` reads filled in."""
    return Notice(change=change, subscriber=subscriber, product_code=None, at=at, kind=str(change),
                  shape="sns", message_id=None)


# ---- SNS -----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("action", "change"), SNS_CHANGES)
def test_each_sns_action_in_an_envelope_means_its_change(action: str, change: Change) -> None:
    """Every documented action maps to its change; the time and id are the envelope's."""
    n = parse_message(sns_message(action, customer_identifier="X01EXAMPLEX", at=AT, message_id="m-1"))
    assert n == Notice(change=change, subscriber="identifier:X01EXAMPLEX", product_code="prod-test", at=AT,
                       kind=action, shape="sns", message_id="m-1",
                       offer="offer-abcexample123" if action.startswith("subscribe-") else None)


@pytest.mark.parametrize(("action", "change"), SNS_CHANGES)
def test_each_sns_action_delivered_raw_takes_sent_at(action: str, change: Change) -> None:
    """Raw message delivery gives the inner JSON alone: the time is the caller's sent_at, there is no id."""
    n = parse_message(sns_message(action, aws_account_id=ACCOUNT, raw=True), sent_at=AT + 7)
    assert (n.change, n.subscriber, n.at, n.message_id, n.shape) == (change, SUBSCRIBER, AT + 7, None, "sns")


def test_a_raw_sns_message_without_sent_at_is_rejected() -> None:
    """A raw message has no time of its own, so without sent_at it cannot be ordered."""
    with pytest.raises(UnparseableMessage, match="no time"):
        parse_message(sns_message("subscribe-success", customer_identifier="c", raw=True))


def test_the_envelope_time_wins_over_sent_at() -> None:
    """AWS's publish time orders messages, not when SQS happened to take them."""
    n = parse_message(sns_message("unsubscribe-pending", customer_identifier="c", at=AT), sent_at=AT + 99)
    assert n.at == AT


def test_an_account_id_names_an_account_subscriber_and_an_identifier_wins_over_it() -> None:
    """customer-aws-account-id gives 'account:<id>'; a message naming both is an identifier-based product's."""
    assert parse_message(sns_message("subscribe-success", aws_account_id=ACCOUNT)).subscriber == SUBSCRIBER
    both = sns_message("subscribe-success", customer_identifier="X01", aws_account_id=ACCOUNT)
    assert parse_message(both).subscriber == "identifier:X01"


def test_the_docs_example_and_the_older_spelling_parse() -> None:
    """The page's example (a space before the identifier) and its older CustomerIdentifier/ProductCode."""
    n = parse_message(DOCS_SNS_INNER, sent_at=AT)
    assert (n.subscriber, n.product_code, n.offer) == ("identifier:X01EXAMPLEX", "n0123EXAMPLEXXXXXXXXXXXX",
                                                       "offer-abcexample123")
    old = json.dumps({"action": "unsubscribe-success", "CustomerIdentifier": "X01", "ProductCode": "p1"})
    assert parse_message(old, sent_at=AT).subscriber == "identifier:X01"
    assert parse_message(old, sent_at=AT).product_code == "p1"


def test_an_envelope_whose_message_is_an_object_is_read_too() -> None:
    """AWS's sample integration queues envelopes whose Message is an object, not a string."""
    body = json.dumps({"Type": "Notification", "Message": sns_inner("subscribe-success", customer_identifier="c"),
                       "Timestamp": "2026-11-28T10:02:00.000Z", "Subject": None})
    assert parse_message(body).change is Change.SUBSCRIBED


# ---- EventBridge ---------------------------------------------------------------------------------

@pytest.mark.parametrize("role", ["Manufacturer", "Proposer"])
@pytest.mark.parametrize(("base", "change"), EVENT_CHANGES)
def test_each_detail_type_means_its_change(base: str, change: Change, role: str) -> None:
    """Every known detail-type, in both role variants, maps to its change with the docs' fields."""
    kind = f"{base} - {role}"
    n = parse_message(eventbridge_event(kind, aws_account_id=ACCOUNT, at=AT, event_id="e-1"))
    licence = base.startswith("License ")
    assert n == Notice(change=change, subscriber=SUBSCRIBER, product_code="prod-test" if licence else None, at=AT,
                       kind=kind, shape="eventbridge", message_id="e-1",
                       license_arn=license_arn_of(ACCOUNT) if licence else None, offer=OFFER_ID,
                       agreement_id=AGREEMENT_ID, product_id=PRODUCT_ID if licence else None)


def test_the_docs_license_deprovisioned_example_parses_as_it_stands() -> None:
    """The documented example, with its malformed licence ARN kept exactly as sent."""
    n = parse_message(DOCS_LICENSE_DEPROVISIONED)
    assert n == Notice(change=Change.ENDED, subscriber="account:845735284135",
                       product_code="aw4fgf5tyo5w2ap6fEXAMPLE", at=1725053763,
                       kind="License Deprovisioned - Manufacturer", shape="eventbridge",
                       message_id="12345678-1234-1234-1234-123456789012",
                       license_arn="aws:license-manager:us-east-1:123456789012:l-e52ca6f38bf84d0fafb8802ca15ac11x",
                       offer="8kkr91jo647j3qxlcjhlqce7y", agreement_id="agmt-4mwg1nevbokzw95eca5797ixs",
                       product_id="prod-qtwveEXAMPLE")


@pytest.mark.parametrize(("status", "change"), [("CANCELLED", Change.END_BEGAN), ("EXPIRED", Change.END_BEGAN),
                                                ("TERMINATED", Change.END_BEGAN), (None, Change.END_BEGAN),
                                                ("RENEWED", Change.NOTICE), ("REPLACED", Change.NOTICE)])
def test_an_agreement_that_ends_into_a_successor_is_not_an_end(status: str | None, change: Change) -> None:
    """Ended as RENEWED or REPLACED: a new agreement carries on (its own Created follows)."""
    body = json.loads(eventbridge_event("Purchase Agreement Ended - Proposer", aws_account_id=ACCOUNT))
    if status is None:
        del body["detail"]["agreement"]["status"]
    else:
        body["detail"]["agreement"]["status"] = status
    assert parse_message(json.dumps(body)).change is change


def test_a_product_code_under_detail_product_code_is_read() -> None:
    """An agreement event carries no product.code in the docs; the flat spelling is accepted if it comes."""
    body = json.loads(eventbridge_event("Purchase Agreement Created - Manufacturer", aws_account_id=ACCOUNT))
    body["detail"]["productCode"] = "p-flat"
    assert parse_message(json.dumps(body)).product_code == "p-flat"


def test_an_event_without_a_time_falls_back_to_sent_at() -> None:
    """A missing or malformed time is replaced by sent_at when the caller has one."""
    body = json.loads(eventbridge_event("License Updated - Manufacturer", aws_account_id=ACCOUNT))
    body["time"] = "yesterday"
    assert parse_message(json.dumps(body), sent_at=AT + 5).at == AT + 5
    del body["time"]
    assert parse_message(json.dumps(body), sent_at=AT + 6).at == AT + 6


# ---- rejections ----------------------------------------------------------------------------------

def _edit(body: str, change: Any) -> str:
    doc = json.loads(body)
    change(doc)
    return json.dumps(doc)


def _set_inner(key: str, value: Any) -> Any:
    def edit(doc: dict[str, Any]) -> None:
        inner = json.loads(doc["Message"])
        if value is None:
            inner.pop(key, None)
        else:
            inner[key] = value
        doc["Message"] = json.dumps(inner)
    return edit


ENV = sns_message("subscribe-success", customer_identifier="X01", at=AT)
EVT = eventbridge_event("Purchase Agreement Created - Manufacturer", aws_account_id=ACCOUNT, at=AT)


@pytest.mark.parametrize(("body", "problem"), [
    ("not json", "not JSON"),
    ("", "not JSON"),
    ("[1, 2]", "not an object"),
    ('"subscribe-success"', "not an object"),
    ("{}", "neither"),
    (_edit(ENV, lambda d: d.update(Message="{not json")), "Message is not JSON"),
    (_edit(ENV, lambda d: d.update(Message="[1]")), "Message is not a JSON object"),
    (_edit(ENV, lambda d: d.update(Type="SubscriptionConfirmation")), "not a Notification"),
    (_edit(ENV, _set_inner("action", "subscribe-maybe")), "unknown SNS action"),
    (_edit(ENV, _set_inner("customer-identifier", None)), "names no customer"),
    (_edit(ENV, _set_inner("customer-identifier", "has space")), "customer identifier"),
    (_edit(ENV, _set_inner("customer-identifier", "x" * 256)), "customer identifier"),
    (_edit(ENV, _set_inner("customer-identifier", "caf\u00e9")), "customer identifier"),
    (_edit(ENV, _set_inner("customer-identifier", 42)), "customer-identifier is not a string"),
    (sns_message("subscribe-success", aws_account_id="12345678901"), "not 12 digits"),
    (sns_message("subscribe-success", aws_account_id="\u0661" * 12), "not 12 digits"),
    (_edit(ENV, lambda d: d.pop("Timestamp")), "no SNS Timestamp"),
    (_edit(ENV, lambda d: d.update(Timestamp="2026-11-28 10:02")), "not an RFC 3339"),
    (_edit(EVT, lambda d: d.update({"detail-type": "Offer Released"})), "unknown detail-type"),
    (_edit(EVT, lambda d: d.update({"detail-type": "Purchase Agreement Created - Acceptor"})), "unknown detail-type"),
    (_edit(EVT, lambda d: d.update({"detail-type": "Purchase Agreement Created"})), "unknown detail-type"),
    (_edit(EVT, lambda d: d.update({"detail-type": 7})), "without a detail-type"),
    (_edit(EVT, lambda d: d.update(source="aws.marketplacecatalog")), "not aws.agreement-marketplace"),
    (_edit(EVT, lambda d: d.update(detail=[])), "detail is not an object"),
    (_edit(EVT, lambda d: d["detail"].pop("acceptor")), "names no customer"),
    (_edit(EVT, lambda d: d["detail"].update(acceptor="845735284135")), "detail.acceptor is not an object"),
    (_edit(EVT, lambda d: d["detail"].update(acceptor={"accountId": "8457-3528-4135"})), "not 12 digits"),
    (_edit(EVT, lambda d: d["detail"].update(acceptor={"accountId": 845735284135})), "is not a string"),
    (_edit(EVT, lambda d: d.pop("time")), "no EventBridge time"),
    (_edit(EVT, lambda d: d.update(time="2024-08-30T21:36:03")), "not an RFC 3339"),
    ("[" * 100_000 + "]" * 100_000, "not JSON"),
])
def test_a_message_this_module_cannot_read_is_rejected_with_the_reason(body: str, problem: str) -> None:
    """Each rejection is UnparseableMessage, and its text names what is wrong."""
    with pytest.raises(UnparseableMessage, match=problem):
        parse_message(body)


# ---- times ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "epoch"), [
    ("2024-08-30T21:36:03Z", 1725053763),
    ("2024-08-30t21:36:03z", 1725053763),
    ("2024-08-30T21:36:03.999Z", 1725053763),  # fraction truncated
    ("2024-08-30T23:36:03.5+02:00", 1725053763),
    ("2024-08-30T16:06:03-05:30", 1725053763),
    ("1969-12-31T23:59:59.9Z", -1),  # truncation drops the fraction, even before 1970
    ("0001-01-01T00:00:00+23:59", -62135683140),
    ("9999-12-31T23:59:59-23:59", 253402387139),
])
def test_an_rfc3339_time_becomes_whole_epoch_seconds(text: str, epoch: int) -> None:
    """Z or an offset, with or without a fraction: whole seconds, the fraction cut off."""
    assert parse_rfc3339(text) == epoch


@pytest.mark.parametrize("text", ["2024-08-30", "2024-08-30T21:36:03", "2024-08-30T21:36Z", "2024-02-30T00:00:00Z",
                                  "2024-08-30T24:00:00Z", "2016-12-31T23:59:60Z", "2024-08-30T21:36:03+24:00",
                                  "2024-08-30T21:36:03+01:60", "0000-01-01T00:00:00Z", "\u0662024-08-30T21:36:03Z",
                                  "2024-08-30T21:36:03Z\n", "20240830T213603Z", "1725053763"])
def test_anything_but_rfc3339_is_not_a_time(text: str) -> None:
    """Dates alone, local times, impossible dates, leap seconds and non-ASCII digits are refused."""
    assert parse_rfc3339(text) is None


# ---- subscriber_of -------------------------------------------------------------------------------

@pytest.mark.parametrize(("key", "subscriber"), [
    ("identifier:X01EXAMPLEX", "identifier:X01EXAMPLEX"),
    (f"account:{ACCOUNT}/{license_arn_of(ACCOUNT)}", SUBSCRIBER),
    (f"account:{ACCOUNT}", SUBSCRIBER),
    ("tenant:acme", None),
    ("identifier:", None),
    ("account:123/arn", None),
    ("something-else", None),
])
def test_a_customer_key_names_its_subscriber(key: str, subscriber: str | None) -> None:
    """An account key loses its licence; an identifier key is its own subscriber; a tenant has none."""
    assert subscriber_of(key) == subscriber


def test_a_parsed_notice_and_the_customer_key_agree_on_the_subscriber() -> None:
    """The subscriber of an EventBridge licence event is the subscriber of the customer key built from it."""
    n = parse_message(eventbridge_event("License Updated - Manufacturer", aws_account_id=ACCOUNT))
    assert subscriber_of(f"account:{ACCOUNT}/{n.license_arn}") == n.subscriber


# ---- apply ---------------------------------------------------------------------------------------

def test_the_first_notice_creates_the_subscription_and_a_duplicate_changes_nothing() -> None:
    """A subscription starts from the first state change; the same notice again returns None."""
    first = apply(None, notice(Change.SUBSCRIBED, AT))
    assert first == Subscription(subscriber=SUBSCRIBER, state=SubscriptionState.SUBSCRIBED, state_at=AT,
                                 subscribed_at=AT)
    assert apply(first, notice(Change.SUBSCRIBED, AT)) is None


def test_a_notice_change_never_changes_anything() -> None:
    """entitlement-updated, License Updated and their kind return None, with or without a subscription."""
    assert apply(None, notice(Change.NOTICE, AT)) is None
    sub = apply(None, notice(Change.END_BEGAN, AT))
    assert apply(sub, notice(Change.NOTICE, AT + 100)) is None


def test_an_older_pending_after_a_newer_end_keeps_the_end_but_records_its_time() -> None:
    """Out of order: the state stays ended, the late unsubscribe-pending's time is still kept."""
    ended = apply(None, notice(Change.ENDED, AT + 3600))
    late = apply(ended, notice(Change.END_BEGAN, AT))
    assert late == Subscription(subscriber=SUBSCRIBER, state=SubscriptionState.ENDED, state_at=AT + 3600,
                                end_began_at=AT, ended_at=AT + 3600)
    assert apply(late, notice(Change.END_BEGAN, AT - 10)) is None  # older still: its kind keeps the newest time


def test_a_re_subscribe_after_an_end_subscribes_again() -> None:
    """subscribe-success newer than the end moves the state back to subscribed; the end's times stay."""
    sub = fold([notice(Change.SUBSCRIBED, AT), notice(Change.END_BEGAN, AT + 10), notice(Change.ENDED, AT + 20),
                notice(Change.SUBSCRIBED, AT + 30)])
    assert sub == Subscription(subscriber=SUBSCRIBER, state=SubscriptionState.SUBSCRIBED, state_at=AT + 30,
                               subscribed_at=AT + 30, end_began_at=AT + 10, ended_at=AT + 20)


@pytest.mark.parametrize(("first", "second", "state"), [
    (Change.SUBSCRIBED, Change.END_BEGAN, SubscriptionState.PENDING_END),
    (Change.END_BEGAN, Change.SUBSCRIBED, SubscriptionState.PENDING_END),
    (Change.ENDED, Change.FAILED, SubscriptionState.ENDED),
    (Change.SUBSCRIBED, Change.FAILED, SubscriptionState.FAILED),
])
def test_a_tie_at_the_same_second_goes_to_the_later_stage(first: Change, second: Change,
                                                          state: SubscriptionState) -> None:
    """Same `at`: subscribed < failed < pending_end < ended, in either arrival order."""
    sub = fold([notice(first, AT), notice(second, AT)])
    assert sub is not None and (sub.state, sub.state_at) == (state, AT)


def test_a_later_success_overrides_a_failed_subscribe() -> None:
    """subscribe-fail then subscribe-success (payment retried): subscribed."""
    sub = fold([notice(Change.FAILED, AT), notice(Change.SUBSCRIBED, AT + 60)])
    assert sub is not None and sub.state is SubscriptionState.SUBSCRIBED and sub.failed_at == AT


def test_a_notice_for_another_subscriber_is_a_programming_error() -> None:
    """Folding two subscribers' notices together would mix their states."""
    sub = apply(None, notice(Change.SUBSCRIBED, AT))
    with pytest.raises(ValueError, match="applied to the subscription of"):
        apply(sub, notice(Change.SUBSCRIBED, AT, subscriber="identifier:other"))


def test_parsed_messages_fold_into_the_documented_lifecycle() -> None:
    """Created, Ended, then Deprovisioned an hour later, delivered backwards and twice: ended, with every time."""
    bodies = [eventbridge_event("Purchase Agreement Created - Proposer", aws_account_id=ACCOUNT, at=AT),
              eventbridge_event("Purchase Agreement Ended - Proposer", aws_account_id=ACCOUNT, at=AT + 100),
              eventbridge_event("License Deprovisioned - Manufacturer", aws_account_id=ACCOUNT, at=AT + 3700)]
    sub = fold([parse_message(b) for b in reversed(bodies + bodies)])
    assert sub == Subscription(subscriber=SUBSCRIBER, state=SubscriptionState.ENDED, state_at=AT + 3700,
                               subscribed_at=AT, end_began_at=AT + 100, ended_at=AT + 3700)


CHANGES = st.sampled_from([Change.SUBSCRIBED, Change.FAILED, Change.END_BEGAN, Change.ENDED, Change.NOTICE])
# The rule, restated here rather than imported: a change's state and its stage at a tie.
STAGE = {Change.SUBSCRIBED: (0, SubscriptionState.SUBSCRIBED), Change.FAILED: (1, SubscriptionState.FAILED),
         Change.END_BEGAN: (2, SubscriptionState.PENDING_END), Change.ENDED: (3, SubscriptionState.ENDED)}


@st.composite
def delivered(draw: st.DrawFn) -> tuple[list[Notice], list[Notice]]:
    """Notices for one subscriber (times close together, so ties happen), delivered with duplicates,
    and the same deliveries in another order."""
    distinct = draw(st.lists(st.builds(notice, CHANGES, st.integers(AT, AT + 5)), min_size=1, max_size=8))
    deliveries = draw(st.lists(st.sampled_from(distinct), min_size=len(distinct), max_size=3 * len(distinct))
                      .filter(lambda ds: all(n in ds for n in distinct)))
    return deliveries, draw(st.permutations(deliveries))


@given(delivered())
def test_any_order_of_the_same_deliveries_folds_to_the_same_subscription(
        case: tuple[list[Notice], list[Notice]]) -> None:
    """SQS is at-least-once and unordered: any permutation, duplicates included, gives one result."""
    deliveries, shuffled = case
    result = fold(deliveries)
    assert fold(shuffled) == result
    changes = [n for n in deliveries if n.change is not Change.NOTICE]
    if not changes:
        assert result is None
        return
    assert result is not None
    best = max(changes, key=lambda n: (n.at, STAGE[n.change][0]))
    assert (result.state_at, result.state) == (best.at, STAGE[best.change][1])
    for change, value in ((Change.SUBSCRIBED, result.subscribed_at), (Change.FAILED, result.failed_at),
                          (Change.END_BEGAN, result.end_began_at), (Change.ENDED, result.ended_at)):
        assert value == max((n.at for n in changes if n.change is change), default=None)


# ---- builders round-trip -------------------------------------------------------------------------

IDENTIFIERS = st.from_regex(r"[!-~]{1,255}", fullmatch=True)
ACCOUNTS = st.from_regex(r"[0-9]{12}", fullmatch=True)
TIMES = st.integers(0, 4102444800)  # 1970 to 2100


@given(action=st.sampled_from([a for a, _ in SNS_CHANGES]), ident=IDENTIFIERS, at=TIMES, raw=st.booleans())
def test_any_sns_message_parses_back_to_its_fields(action: str, ident: str, at: int, raw: bool) -> None:
    """What the builder writes (envelope or raw) parses to the same subscriber, action and time."""
    n = parse_message(sns_message(action, customer_identifier=ident, at=at, raw=raw), sent_at=at if raw else None)
    assert (n.subscriber, n.kind, n.at, n.change) == (f"identifier:{ident}", action, at, dict(SNS_CHANGES)[action])


@given(base=st.sampled_from([b for b, _ in EVENT_CHANGES]), account=ACCOUNTS, at=TIMES)
def test_any_eventbridge_event_parses_back_to_its_fields(base: str, account: str, at: int) -> None:
    """What the builder writes parses to the same account, detail-type and time."""
    kind = f"{base} - Manufacturer"
    n = parse_message(eventbridge_event(kind, aws_account_id=account, at=at))
    assert (n.subscriber, n.kind, n.at, n.change) == (f"account:{account}", kind, at, dict(EVENT_CHANGES)[base])


# ---- never anything but UnparseableMessage -------------------------------------------------------

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=20)
KEYS = st.sampled_from(["Type", "Message", "Timestamp", "MessageId", "action", "Action", "customer-identifier",
                        "CustomerIdentifier", "customer-aws-account-id", "product-code", "ProductCode",
                        "offer-identifier", "detail-type", "source", "time", "id", "detail", "agreement", "status",
                        "acceptor", "accountId", "license", "arn", "product", "code", "productCode", "offer"])
VALUES = st.sampled_from(["Notification", "subscribe-success", "unsubscribe-pending", "aws.agreement-marketplace",
                          "Purchase Agreement Ended - Manufacturer", "License Updated - Proposer", "RENEWED",
                          "2024-08-30T21:36:03Z", "2024-02-30T00:00:00+99:99", ACCOUNT, "X01", ""])
VOCABULARY = st.recursive(VALUES | JSON, lambda inner: st.dictionaries(KEYS, inner, max_size=6), max_leaves=25)


def _only_unparseable(body: str, sent_at: int | None) -> None:
    try:
        parse_message(body, sent_at=sent_at)
    except UnparseableMessage:
        pass


@given(st.text(), st.none() | TIMES)
def test_arbitrary_text_never_raises_anything_else(body: str, sent_at: int | None) -> None:
    """Any string: a Notice or UnparseableMessage, never another exception."""
    _only_unparseable(body, sent_at)


@given(JSON, st.none() | TIMES)
def test_arbitrary_json_never_raises_anything_else(doc: Any, sent_at: int | None) -> None:
    """Any JSON document: a Notice or UnparseableMessage, never another exception."""
    _only_unparseable(json.dumps(doc), sent_at)


@given(st.dictionaries(KEYS, VOCABULARY, max_size=8), st.booleans(), st.none() | TIMES)
def test_messages_built_from_the_real_field_names_never_raise_anything_else(
        doc: dict[str, Any], wrap: bool, sent_at: int | None) -> None:
    """Objects using the real keys with wrong or odd values (also inside an SNS envelope) reach deep
    into the parser: still a Notice or UnparseableMessage."""
    body = json.dumps({"Type": "Notification", "Message": json.dumps(doc)} if wrap else doc)
    _only_unparseable(body, sent_at)


# ---- when an ending customer's later usage is sealed (sidecar.store.lifecycle.final_seal) ----------

def test_the_final_seal_waits_for_the_deadline_then_seals_each_hour_as_it_begins() -> None:
    """Before the deadline only hours that are over are sealed (the current hour keeps collecting);
    from the deadline the current hour too, with remainders settled only in the first hour after it."""
    from sidecar.store.lifecycle import final_seal

    began = 1_800_000_000 + 30 * 60  # hh:30
    hour = began - 30 * 60
    assert final_seal(now=began + 60, began=began, final_seal_s=3000) == (hour, False)
    assert final_seal(now=began + 3000, began=began, final_seal_s=3000) == (hour + 2 * 3600, True)
    assert final_seal(now=began + 3000 + 3600, began=began, final_seal_s=3000) == (hour + 3 * 3600, False)
    assert final_seal(now=began, began=began, final_seal_s=0) == (hour + 3600, True)
