"""Calls the scoring and segmentation services of a running `clm up` through
stubs generated from proto/: a touchpoint recorded in the customer service is
scored by a model and moves the customer into a segment on that score."""

import os
import time
import uuid

import grpc
import pytest
from google.protobuf import timestamp_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from clm.customer.v1 import customer_pb2, customer_service_pb2, customer_service_pb2_grpc
from clm.scoring.v1 import scoring_pb2, scoring_service_pb2, scoring_service_pb2_grpc
from clm.segmentation.v1 import segmentation_service_pb2, segmentation_service_pb2_grpc

CUSTOMER = os.environ.get("CLM_CUSTOMER_ADDR", "127.0.0.1:50051")
HOST, PORT = CUSTOMER.rsplit(":", 1)
# `clm up --base-port P` puts scoring on P+1 and segmentation on P+2
# (run.sh passes the addresses `clm up --base-port 0` printed).
SCORING = os.environ.get("CLM_SCORING_ADDR", f"{HOST}:{int(PORT) + 1}")
SEGMENTATION = os.environ.get("CLM_SEGMENTATION_ADDR", f"{HOST}:{int(PORT) + 2}")


def ready(addr, call):
    ch = grpc.insecure_channel(addr)
    grpc.channel_ready_future(ch).result(timeout=60)
    deadline = time.time() + 60
    while True:
        try:
            call(ch)
            return ch
        except grpc.RpcError:
            if time.time() > deadline:
                raise
            time.sleep(0.2)


@pytest.fixture(scope="module")
def stubs():
    c = ready(
        CUSTOMER,
        lambda ch: customer_service_pb2_grpc.CustomerServiceStub(ch).ListCustomers(
            customer_service_pb2.ListCustomersRequest(page_size=1), timeout=5
        ),
    )
    s = ready(
        SCORING,
        lambda ch: scoring_service_pb2_grpc.ScoringServiceStub(ch).ListScoringModels(
            scoring_service_pb2.ListScoringModelsRequest(), timeout=5
        ),
    )
    g = ready(
        SEGMENTATION,
        lambda ch: segmentation_service_pb2_grpc.SegmentationServiceStub(ch).ListSegments(
            segmentation_service_pb2.ListSegmentsRequest(), timeout=5
        ),
    )
    yield (
        customer_service_pb2_grpc.CustomerServiceStub(c),
        scoring_service_pb2_grpc.ScoringServiceStub(s),
        segmentation_service_pb2_grpc.SegmentationServiceStub(g),
    )
    for ch in (c, s, g):
        ch.close()


def eventually(check, timeout=30):
    deadline = time.time() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.time() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.1)


def test_a_scored_touchpoint_moves_the_customer_into_a_score_segment(stubs):
    customers, scoring, segments = stubs
    tag = uuid.uuid4().hex[:8]
    model = scoring.CreateScoringModel(
        scoring_service_pb2.CreateScoringModelRequest(
            scoring_model_id=f"py-{tag}",
            scoring_model=scoring_pb2.ScoringModel(
                display_name="Python leads",
                rules=[
                    scoring_pb2.ScoringRule(
                        id="exports",
                        score="engagement",
                        points=10,
                        touchpoint='feature_use where feature = "export"',
                    )
                ],
            ),
        )
    )
    segment = segments.CreateSegment(
        segmentation_service_pb2.CreateSegmentRequest(
            segment=segmentation_service_pb2.Segment(
                display_name=f"Engaged {tag}", owner="growth", rule_text=f'score("py-{tag}").engagement >= 10'
            )
        )
    )
    c = customers.CreateCustomer(
        customer_service_pb2.CreateCustomerRequest(
            customer=customer_pb2.Customer(email=f"py-score-{tag}@example.com")
        )
    )
    customers.RecordTouchpoints(
        customer_service_pb2.RecordTouchpointsRequest(
            touchpoints=[
                customer_pb2.Touchpoint(
                    customer=c.name,
                    event_id=f"py-export-{tag}",
                    type=customer_pb2.TOUCHPOINT_TYPE_FEATURE_USE,
                    feature="export",
                    occurred_time=timestamp_pb2.Timestamp(seconds=int(time.time())),
                )
            ]
        )
    )

    def engagement():
        scores = scoring.GetScore(
            scoring_service_pb2.GetScoreRequest(customer=c.name, scoring_model=model.name)
        )
        return next((s.value for s in scores.scores if s.score == "engagement" and s.value >= 10), None)

    assert eventually(engagement) == 10
    eventually(
        lambda: segments.IsMember(
            segmentation_service_pb2.IsMemberRequest(segment=segment.name, customer=c.name)
        ).member
    )


def test_a_bad_rule_names_its_field_line_and_column(stubs):
    _, _, segments = stubs
    with pytest.raises(grpc.RpcError) as err:
        segments.CreateSegment(
            segmentation_service_pb2.CreateSegmentRequest(
                segment=segmentation_service_pb2.Segment(
                    display_name="Broken", owner="growth", rule_text="age >= "
                )
            )
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(err.value)
    fields = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields += [v.field for v in bad.field_violations]
    assert "segment.rule_text" in fields
    assert "line 1" in err.value.details() or "1:" in err.value.details()
