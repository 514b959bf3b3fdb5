"""Journey 6: the closed feedback loop (journey 2 of tests/e2e/journeys.rs)
driven from Python through stubs generated from proto/, against a running
`clm up`: a loyal customer answers NPS 3, the score falls, they enter an
at-risk segment, a recovery reward limited to it becomes eligible and is
redeemed; NPS 10 takes them out and the reward is refused NOT_ELIGIBLE. The
Customer 360 view shows every part in one call."""

import os
import time
import uuid

import grpc
import pytest
from google.protobuf import duration_pb2, timestamp_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from clm.common.v1 import types_pb2
from clm.customer.v1 import customer_pb2, customer_service_pb2, customer_service_pb2_grpc
from clm.customer.v1 import customer_view_pb2
from clm.feedback.v1 import feedback_service_pb2, feedback_service_pb2_grpc, survey_pb2
from clm.loyalty.v1 import loyalty_pb2, loyalty_service_pb2, loyalty_service_pb2_grpc
from clm.scoring.v1 import scoring_pb2, scoring_service_pb2, scoring_service_pb2_grpc
from clm.segmentation.v1 import segmentation_service_pb2, segmentation_service_pb2_grpc

CUSTOMER = os.environ.get("CLM_CUSTOMER_ADDR", "127.0.0.1:50051")
HOST, PORT = CUSTOMER.rsplit(":", 1)
SCORING = os.environ.get("CLM_SCORING_ADDR", f"{HOST}:{int(PORT) + 1}")
SEGMENTATION = os.environ.get("CLM_SEGMENTATION_ADDR", f"{HOST}:{int(PORT) + 2}")
FEEDBACK = os.environ.get("CLM_FEEDBACK_ADDR", f"{HOST}:{int(PORT) + 3}")
LOYALTY = os.environ.get("CLM_LOYALTY_ADDR", f"{HOST}:{int(PORT) + 4}")


def channel(addr):
    ch = grpc.insecure_channel(addr)
    grpc.channel_ready_future(ch).result(timeout=60)
    return ch


@pytest.fixture(scope="module")
def clm():
    chans = [channel(a) for a in (CUSTOMER, SCORING, SEGMENTATION, FEEDBACK, LOYALTY)]
    yield (
        customer_service_pb2_grpc.CustomerServiceStub(chans[0]),
        scoring_service_pb2_grpc.ScoringServiceStub(chans[1]),
        segmentation_service_pb2_grpc.SegmentationServiceStub(chans[2]),
        feedback_service_pb2_grpc.FeedbackServiceStub(chans[3]),
        loyalty_service_pb2_grpc.LoyaltyServiceStub(chans[4]),
    )
    for ch in chans:
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


def reason(err):
    status = rpc_status.from_call(err)
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason
    return ""


def test_the_closed_feedback_loop(clm):
    customers, scoring, segments, feedback, loyalty = clm
    run = uuid.uuid4().hex[:8]
    score = f"risk{run}"
    model = f"loop{run}"
    program = f"club{run}"

    # A score of this run's own: +10 a feature use, +50 a purchase, -30 an
    # NPS detractor, +30 a promoter.
    def nps(category):
        return scoring_pb2.SurveyAnswerTrigger(
            kind=survey_pb2.QUESTION_KIND_NPS, nps_category=category
        )

    scoring.CreateScoringModel(
        scoring_service_pb2.CreateScoringModelRequest(
            scoring_model=scoring_pb2.ScoringModel(
                display_name="loop",
                scores=[scoring_pb2.ScoreDefinition(name=score)],
                rules=[
                    scoring_pb2.ScoringRule(id="uses", score=score, points=10, touchpoint="feature_use"),
                    scoring_pb2.ScoringRule(id="buys", score=score, points=50, touchpoint="purchase"),
                    scoring_pb2.ScoringRule(
                        id="detractor", score=score, points=-30,
                        survey_answer=nps(survey_pb2.NPS_CATEGORY_DETRACTOR),
                    ),
                    scoring_pb2.ScoringRule(
                        id="promoter", score=score, points=30,
                        survey_answer=nps(survey_pb2.NPS_CATEGORY_PROMOTER),
                    ),
                ],
            ),
            scoring_model_id=model,
            request_id=f"model-{run}",
        )
    )
    loyalty.CreateProgram(
        loyalty_service_pb2.CreateProgramRequest(
            program=loyalty_pb2.Program(
                display_name="Club",
                earning_rules=[
                    loyalty_pb2.EarningRule(
                        id="buy", trigger=loyalty_pb2.EARNING_TRIGGER_PURCHASE,
                        currency_code="EUR", points_per_unit=1, unit_minor=100,
                    )
                ],
                tiers=[loyalty_pb2.Tier(id="gold", threshold=0)],
                loyalty_tier="gold",
                auto_enroll=True,
            ),
            program_id=program,
            request_id=f"program-{run}",
        )
    )

    c = customers.CreateCustomer(
        customer_service_pb2.CreateCustomerRequest(
            customer=customer_pb2.Customer(email=f"loop-{run}@example.com"),
            request_id=f"customer-{run}",
        )
    ).name
    customers.SetConsent(
        customer_service_pb2.SetConsentRequest(
            name=c,
            settings=[
                customer_service_pb2.ConsentSetting(
                    purpose=customer_pb2.CONSENT_PURPOSE_SURVEYS,
                    channel=customer_pb2.CONSENT_CHANNEL_IN_APP,
                    state=customer_pb2.CONSENT_STATE_GRANTED,
                )
            ],
            source=customer_pb2.CONSENT_SOURCE_API,
            request_id=f"consent-{run}",
        )
    )
    now = timestamp_pb2.Timestamp()
    now.GetCurrentTime()
    touchpoints = [
        customer_pb2.Touchpoint(
            customer=c, event_id=f"use-{run}-{i}", type=customer_pb2.TOUCHPOINT_TYPE_FEATURE_USE,
            feature="export", occurred_time=now,
        )
        for i in range(2)
    ] + [
        customer_pb2.Touchpoint(
            customer=c, event_id=f"order-{run}", type=customer_pb2.TOUCHPOINT_TYPE_PURCHASE,
            revenue=types_pb2.Money(currency_code="EUR", amount_minor=2000), occurred_time=now,
        )
    ]
    customers.RecordTouchpoints(customer_service_pb2.RecordTouchpointsRequest(touchpoints=touchpoints))
    member = f"programs/{program}/members/{c.split('/')[1]}"

    def stage():
        return customers.GetCustomer(customer_service_pb2.GetCustomerRequest(name=c)).stage

    def value():
        s = scoring.GetScore(scoring_service_pb2.GetScoreRequest(customer=c, scoring_model=f"scoringModels/{model}"))
        return next((v.value for v in s.scores if v.score == score), None)

    def in_segment():
        return segments.IsMember(segmentation_service_pb2.IsMemberRequest(segment=at_risk, customer=c)).member

    def eligible():
        r = loyalty.ListEligibleRewards(loyalty_service_pb2.ListEligibleRewardsRequest(member=member))
        return any(x.name == reward for x in r.rewards)

    # Enrolled in gold, the loyalty tier: a loyal customer; engagement 70.
    eventually(lambda: stage() == customer_pb2.STAGE_LOYALTY)
    eventually(lambda: value() == 70.0)
    # Segmentation learns the new score's name from scoring's stream (once
    # a customer has it).
    def create_segment():
        try:
            return segments.CreateSegment(
                segmentation_service_pb2.CreateSegmentRequest(
                    segment=segmentation_service_pb2.Segment(
                        display_name=f"at risk {run}", rule_text=f"score.{score} < 50"
                    ),
                    request_id=f"segment-{run}",
                )
            ).name
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e
            return None

    at_risk = eventually(create_segment)
    reward = loyalty.CreateReward(
        loyalty_service_pb2.CreateRewardRequest(
            parent=f"programs/{program}",
            reward=loyalty_pb2.Reward(display_name="Sorry", cost=10, eligible_segment=at_risk),
            reward_id="recovery",
            request_id=f"reward-{run}",
        )
    ).name
    eventually(lambda: not in_segment())
    assert not eligible()

    survey = feedback.CreateSurvey(
        feedback_service_pb2.CreateSurveyRequest(
            survey=survey_pb2.Survey(
                display_name="nps",
                questions=[
                    survey_pb2.Question(
                        id="nps", kind=survey_pb2.QUESTION_KIND_NPS,
                        text={"en": "How likely are you to recommend us?"}, required=True,
                    )
                ],
                recontact_period=duration_pb2.Duration(seconds=0),
            ),
            survey_id=f"nps{run}",
            request_id=f"survey-{run}",
        )
    ).name
    feedback.PublishSurvey(feedback_service_pb2.PublishSurveyRequest(name=survey))

    def answer(response, nps_value):
        def invite():
            r = feedback.CreateInvitations(
                feedback_service_pb2.CreateInvitationsRequest(
                    survey=survey, customers=[c], channel=customer_pb2.CONSENT_CHANNEL_IN_APP
                )
            )
            return r.invitations[0] if r.invitations else None

        invitation = eventually(invite)
        feedback.SubmitResponse(
            feedback_service_pb2.SubmitResponseRequest(
                name=f"{survey}/responses/{response}",
                invitation=invitation.name,
                answers=[survey_pb2.Answer(question="nps", number=nps_value)],
                finish=True,
            )
        )

    # NPS 3: a detractor, 70 - 30 = 40 < 50: at risk; the reward is
    # eligible and redeemed.
    answer("r1", 3)
    eventually(in_segment)
    assert value() == 40.0
    assert eligible()
    loyalty.RedeemReward(
        loyalty_service_pb2.RedeemRewardRequest(member=member, reward=reward, request_id=f"redeem-{run}-1")
    )

    view = customers.GetCustomerView(customer_service_pb2.GetCustomerViewRequest(name=c))
    available = customer_view_pb2.VIEW_PART_STATE_AVAILABLE
    assert view.customer.stage == customer_pb2.STAGE_LOYALTY
    assert view.scores.part.state == available
    assert view.segments.part.state == available and at_risk in view.segments.segments
    assert view.feedback.part.state == available
    assert view.feedback.feedback.last_nps == 3
    assert view.feedback.feedback.last_nps_category == survey_pb2.NPS_CATEGORY_DETRACTOR
    assert view.loyalty.part.state == available
    gold = [m for m in view.loyalty.memberships if m.name == member]
    assert gold and gold[0].tier == "gold" and gold[0].balance == 10

    # NPS 10: a promoter, 70 >= 50: out of the segment, the reward refused.
    answer("r2", 10)
    eventually(lambda: not in_segment())
    assert not eligible()
    with pytest.raises(grpc.RpcError) as e:
        loyalty.RedeemReward(
            loyalty_service_pb2.RedeemRewardRequest(member=member, reward=reward, request_id=f"redeem-{run}-2")
        )
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert reason(e.value) == "NOT_ELIGIBLE"
