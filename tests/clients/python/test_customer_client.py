"""Calls a running `clm up` through stubs generated from proto/ by grpcio-tools."""

import os
import time
import uuid

import grpc
import pytest
from google.protobuf import field_mask_pb2, timestamp_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from clm.common.v1 import changes_pb2, changes_pb2_grpc
from clm.customer.v1 import customer_pb2, customer_service_pb2, customer_service_pb2_grpc

ADDR = os.environ.get("CLM_CUSTOMER_ADDR", "127.0.0.1:50051")


@pytest.fixture(scope="module")
def channel():
    ch = grpc.insecure_channel(ADDR)
    grpc.channel_ready_future(ch).result(timeout=60)
    # Wait until migrations are done and the service answers.
    stub = customer_service_pb2_grpc.CustomerServiceStub(ch)
    deadline = time.time() + 60
    while True:
        try:
            stub.ListCustomers(customer_service_pb2.ListCustomersRequest(page_size=1), timeout=5)
            break
        except grpc.RpcError:
            if time.time() > deadline:
                raise
            time.sleep(0.2)
    yield ch
    ch.close()


@pytest.fixture
def stub(channel):
    return customer_service_pb2_grpc.CustomerServiceStub(channel)


def ts(seconds):
    return timestamp_pb2.Timestamp(seconds=seconds)


def new_customer(stub, email):
    return stub.CreateCustomer(
        customer_service_pb2.CreateCustomerRequest(
            customer=customer_pb2.Customer(email=email, display_name="Py Thon"),
            request_id=str(uuid.uuid4()),
        )
    )


def test_create_record_and_read_timeline(stub):
    email = f"py-{uuid.uuid4().hex[:8]}@example.com"
    c = new_customer(stub, email)
    assert c.name.startswith("customers/")
    assert c.stage == customer_pb2.STAGE_APPROACH

    events = [
        customer_pb2.Touchpoint(
            customer=c.name,
            event_id=f"{c.name}-{i}",
            type=customer_pb2.TOUCHPOINT_TYPE_FEATURE_USE,
            feature="reports",
            occurred_time=ts(1_760_000_000 + i),
        )
        for i in range(5)
    ]
    r = stub.RecordTouchpoints(customer_service_pb2.RecordTouchpointsRequest(touchpoints=events))
    assert (r.recorded_count, r.duplicate_count) == (5, 0)
    again = stub.RecordTouchpoints(customer_service_pb2.RecordTouchpointsRequest(touchpoints=events))
    assert (again.recorded_count, again.duplicate_count) == (0, 5)

    page = stub.ListTouchpoints(customer_service_pb2.ListTouchpointsRequest(parent=c.name, page_size=3))
    assert [t.event_id for t in page.touchpoints] == [f"{c.name}-{i}" for i in (4, 3, 2)]
    rest = stub.ListTouchpoints(
        customer_service_pb2.ListTouchpointsRequest(parent=c.name, page_size=3, page_token=page.next_page_token)
    )
    assert [t.event_id for t in rest.touchpoints] == [f"{c.name}-{i}" for i in (1, 0)]
    assert rest.next_page_token == ""


def test_update_and_stage_transition(stub):
    c = new_customer(stub, f"py-{uuid.uuid4().hex[:8]}@example.com")
    c.display_name = "Renamed"
    updated = stub.UpdateCustomer(
        customer_service_pb2.UpdateCustomerRequest(customer=c, update_mask=field_mask_pb2.FieldMask(paths=["display_name"]))
    )
    assert updated.display_name == "Renamed"
    moved = stub.TransitionStage(
        customer_service_pb2.TransitionStageRequest(
            name=c.name, to_stage=customer_pb2.STAGE_CONVERSION, reason="bought", etag=updated.etag
        )
    )
    assert moved.customer.stage == customer_pb2.STAGE_CONVERSION
    history = stub.ListStageHistory(customer_service_pb2.ListStageHistoryRequest(parent=c.name))
    assert [h.to_stage for h in history.changes] == [customer_pb2.STAGE_APPROACH, customer_pb2.STAGE_CONVERSION]


def test_bad_input_is_invalid_argument_with_field_violation(stub):
    with pytest.raises(grpc.RpcError) as err:
        stub.CreateCustomer(customer_service_pb2.CreateCustomerRequest(customer=customer_pb2.Customer(email="nope")))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(err.value)
    fields = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            br = error_details_pb2.BadRequest()
            detail.Unpack(br)
            fields.extend(v.field for v in br.field_violations)
    assert "customer.email" in fields


def test_change_stream_carries_the_events(channel, stub):
    c = new_customer(stub, f"py-{uuid.uuid4().hex[:8]}@example.com")
    watch = changes_pb2_grpc.ChangeStreamServiceStub(channel)
    stream = watch.WatchChanges(
        changes_pb2.WatchChangesRequest(after_sequence=0, event_types=["clm.customer.v1.CustomerCreated"]), timeout=10
    )
    subjects = set()
    for resp in stream:
        subjects.add(resp.event.subject)
        if c.name in subjects:
            stream.cancel()
            break
    assert c.name in subjects


def test_consent_defaults_set_and_history(stub):
    c = new_customer(stub, f"py-consent-{uuid.uuid4().hex[:8]}@example.com")
    got = stub.GetConsent(customer_service_pb2.GetConsentRequest(name=c.name))
    assert len(got.entries) == 20
    marketing_email = lambda consent: next(
        e
        for e in consent.entries
        if e.purpose == customer_pb2.CONSENT_PURPOSE_MARKETING
        and e.channel == customer_pb2.CONSENT_CHANNEL_EMAIL
    )
    assert marketing_email(got).state == customer_pb2.CONSENT_STATE_UNSET
    assert not marketing_email(got).granted

    req = customer_service_pb2.SetConsentRequest(
        name=c.name + "/consent",
        source=customer_pb2.CONSENT_SOURCE_FORM,
        settings=[
            customer_service_pb2.ConsentSetting(
                purpose=customer_pb2.CONSENT_PURPOSE_MARKETING,
                channel=customer_pb2.CONSENT_CHANNEL_EMAIL,
                state=customer_pb2.CONSENT_STATE_GRANTED,
            )
        ],
        request_id=str(uuid.uuid4()),
    )
    first = stub.SetConsent(req)
    assert marketing_email(first).granted
    assert stub.SetConsent(req) == first  # a retry answers the first result

    got = stub.GetConsent(
        customer_service_pb2.GetConsentRequest(name=c.name, include_history=True)
    )
    assert [(h.from_state, h.to_state) for h in got.history] == [
        (customer_pb2.CONSENT_STATE_UNSET, customer_pb2.CONSENT_STATE_GRANTED)
    ]

    bad = customer_service_pb2.SetConsentRequest(name=c.name, source=customer_pb2.CONSENT_SOURCE_API)
    bad.settings.add(purpose=99, channel=customer_pb2.CONSENT_CHANNEL_EMAIL,
                     state=customer_pb2.CONSENT_STATE_GRANTED)
    with pytest.raises(grpc.RpcError) as e:
        stub.SetConsent(bad)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(e.value)
    br = error_details_pb2.BadRequest()
    assert any(d.Unpack(br) for d in status.details)
    assert [v.field for v in br.field_violations] == ["settings[0].purpose"]


def test_identifiers_and_lookup(stub):
    tag = uuid.uuid4().hex[:8]
    ada = new_customer(stub, f"py-ada-{tag}@example.com")
    bob = new_customer(stub, f"py-bob-{tag}@example.com")
    phone = "+44 20 7946 " + str(int(tag[:4], 16) % 10000).zfill(4)
    added = stub.AddCustomerIdentifier(
        customer_service_pb2.AddCustomerIdentifierRequest(
            parent=ada.name,
            identifier=customer_pb2.CustomerIdentifier(
                type=customer_pb2.IDENTIFIER_TYPE_PHONE, value=phone
            ),
        )
    )
    assert added.value == phone.replace(" ", "")

    with pytest.raises(grpc.RpcError) as e:
        stub.AddCustomerIdentifier(
            customer_service_pb2.AddCustomerIdentifierRequest(
                parent=bob.name,
                identifier=customer_pb2.CustomerIdentifier(
                    type=customer_pb2.IDENTIFIER_TYPE_PHONE, value=added.value
                ),
            )
        )
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert ada.name in e.value.details()

    found = stub.LookupCustomer(
        customer_service_pb2.LookupCustomerRequest(
            identifier=customer_pb2.CustomerIdentifier(
                type=customer_pb2.IDENTIFIER_TYPE_EMAIL, value=f"PY-ADA-{tag}@EXAMPLE.COM"
            )
        )
    )
    assert found.name == ada.name

    batch = stub.BatchLookupCustomers(
        customer_service_pb2.BatchLookupCustomersRequest(
            identifiers=[
                customer_pb2.CustomerIdentifier(type=customer_pb2.IDENTIFIER_TYPE_PHONE, value=phone),
                customer_pb2.CustomerIdentifier(
                    type=customer_pb2.IDENTIFIER_TYPE_EMAIL, value=f"nobody-{tag}@example.com"
                ),
                customer_pb2.CustomerIdentifier(
                    type=customer_pb2.IDENTIFIER_TYPE_EMAIL, value=f"py-bob-{tag}@example.com"
                ),
            ]
        )
    )
    assert [r.customer for r in batch.results] == [ada.name, "", bob.name]

    with pytest.raises(grpc.RpcError) as e:
        stub.LookupCustomer(
            customer_service_pb2.LookupCustomerRequest(
                identifier=customer_pb2.CustomerIdentifier(
                    type=customer_pb2.IDENTIFIER_TYPE_PHONE, value="030 123"
                )
            )
        )
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_erasure_forgets_the_customer(stub):
    tag = uuid.uuid4().hex[:8]
    c = new_customer(stub, f"py-erase-{tag}@example.com")
    req = customer_service_pb2.EraseCustomerRequest(name=c.name, request_id=str(uuid.uuid4()))
    erased = stub.EraseCustomer(req)
    assert erased.name.startswith("erasureRequests/")
    assert erased.customer == c.name
    assert [r.service for r in erased.receipts] == ["customer"]
    assert "customer" in erased.expected_services
    assert stub.EraseCustomer(req).name == erased.name  # a retry answers the first result
    again = stub.EraseCustomer(customer_service_pb2.EraseCustomerRequest(name=c.name))
    assert again.name == erased.name  # erasing twice returns the existing request

    # Complete once every expected service's receipt is in: at once when the
    # customer service is the only one expected, else as the peers' receipts
    # arrive on their change streams.
    get = customer_service_pb2.GetErasureRequestRequest(name=erased.name)
    deadline = time.time() + 30
    got = stub.GetErasureRequest(get)
    while got.state != customer_pb2.ERASURE_STATE_COMPLETED:
        assert got.state == customer_pb2.ERASURE_STATE_IN_PROGRESS
        assert time.time() < deadline, got
        time.sleep(0.1)
        got = stub.GetErasureRequest(get)
    assert sorted(r.service for r in got.receipts) == sorted(got.expected_services)
    assert got.HasField("complete_time")
    assert got.customer == c.name
    with pytest.raises(grpc.RpcError) as e:
        stub.GetCustomer(customer_service_pb2.GetCustomerRequest(name=c.name))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as e:
        stub.LookupCustomer(
            customer_service_pb2.LookupCustomerRequest(
                identifier=customer_pb2.CustomerIdentifier(
                    type=customer_pb2.IDENTIFIER_TYPE_EMAIL, value=f"py-erase-{tag}@example.com"
                )
            )
        )
    assert e.value.code() == grpc.StatusCode.NOT_FOUND

    # Re-importing the erased e-mail is refused (the default policy), and the
    # error shows a hash prefix, never the value.
    with pytest.raises(grpc.RpcError) as e:
        new_customer(stub, f"py-erase-{tag}@example.com")
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "hash" in e.value.details()
    assert f"py-erase-{tag}" not in e.value.details()
    # Nobody is flagged as re-imported under the refuse policy.
    flagged = stub.ListCustomers(
        customer_service_pb2.ListCustomersRequest(filter="reimported_after_erasure = true")
    )
    assert list(flagged.customers) == []
