"""Calls the feedback service of a running `clm up` through stubs generated
from proto/: a survey from creation to its summary (publish, an invitation
under survey consent, a partial then a completed response, NPS and CSAT
computed by the service), and a bad answer refused with its field named."""

import os
import time
import uuid

import grpc
import pytest
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from clm.customer.v1 import customer_pb2, customer_service_pb2, customer_service_pb2_grpc
from clm.feedback.v1 import feedback_service_pb2, feedback_service_pb2_grpc, survey_pb2

CUSTOMER = os.environ.get("CLM_CUSTOMER_ADDR", "127.0.0.1:50051")
HOST, PORT = CUSTOMER.rsplit(":", 1)
FEEDBACK = os.environ.get("CLM_FEEDBACK_ADDR", f"{HOST}:{int(PORT) + 3}")


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
    f = ready(
        FEEDBACK,
        lambda ch: feedback_service_pb2_grpc.FeedbackServiceStub(ch).ListSurveys(
            feedback_service_pb2.ListSurveysRequest(), timeout=5
        ),
    )
    yield (
        customer_service_pb2_grpc.CustomerServiceStub(c),
        feedback_service_pb2_grpc.FeedbackServiceStub(f),
    )
    for ch in (c, f):
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


def test_a_survey_from_creation_to_summary(stubs):
    customers, feedback = stubs
    run = uuid.uuid4().hex[:8]
    who = customers.CreateCustomer(
        customer_service_pb2.CreateCustomerRequest(
            customer=customer_pb2.Customer(email=f"survey-{run}@example.com")
        )
    )
    customers.SetConsent(
        customer_service_pb2.SetConsentRequest(
            name=who.name,
            settings=[
                customer_service_pb2.ConsentSetting(
                    purpose=customer_pb2.CONSENT_PURPOSE_SURVEYS,
                    channel=customer_pb2.CONSENT_CHANNEL_EMAIL,
                    state=customer_pb2.CONSENT_STATE_GRANTED,
                )
            ],
            source=customer_pb2.CONSENT_SOURCE_API,
            request_id=f"consent-{run}",
        )
    )
    survey = feedback.CreateSurvey(
        feedback_service_pb2.CreateSurveyRequest(
            survey_id=f"py-{run}",
            survey=survey_pb2.Survey(
                display_name="After onboarding",
                questions=[
                    survey_pb2.Question(
                        id="nps",
                        kind=survey_pb2.QUESTION_KIND_NPS,
                        text={"en": "How likely are you to recommend us?"},
                        required=True,
                    ),
                    survey_pb2.Question(
                        id="why",
                        kind=survey_pb2.QUESTION_KIND_OPEN_TEXT,
                        text={"en": "What went wrong?"},
                        required=True,
                        show_if=survey_pb2.DisplayCondition(question="nps", max_value=6),
                    ),
                    survey_pb2.Question(
                        id="csat",
                        kind=survey_pb2.QUESTION_KIND_CSAT,
                        text={"en": "How satisfied are you?"},
                    ),
                ],
                targeting=survey_pb2.Targeting(
                    invitation_ttl=duration_pb2.Duration(seconds=7 * 86400)
                ),
            ),
        )
    )
    assert survey.state == survey_pb2.SURVEY_STATE_DRAFT
    survey = feedback.PublishSurvey(feedback_service_pb2.PublishSurveyRequest(name=survey.name))
    assert survey.state == survey_pb2.SURVEY_STATE_PUBLISHED

    # Feedback learns the consent from the customer stream.
    def invite():
        out = feedback.CreateInvitations(
            feedback_service_pb2.CreateInvitationsRequest(
                survey=survey.name,
                customers=[who.name],
                channel=customer_pb2.CONSENT_CHANNEL_EMAIL,
            )
        )
        return out.invitations[0] if out.invitations else None

    invitation = eventually(invite)
    response_name = f"{survey.name}/responses/r-{run}"

    # An NPS of 11 is refused, naming the answer.
    with pytest.raises(grpc.RpcError) as bad:
        feedback.SubmitResponse(
            feedback_service_pb2.SubmitResponseRequest(
                name=response_name,
                invitation=invitation.name,
                answers=[survey_pb2.Answer(question="nps", number=11)],
            )
        )
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    detail = error_details_pb2.BadRequest()
    rpc_status.from_call(bad.value).details[0].Unpack(detail)
    assert detail.field_violations[0].field == "answers[0]"

    # A partial response, then the rest.
    partial = feedback.SubmitResponse(
        feedback_service_pb2.SubmitResponseRequest(
            name=response_name,
            invitation=invitation.name,
            answers=[survey_pb2.Answer(question="nps", number=4)],
        )
    )
    assert not partial.completed
    done = feedback.SubmitResponse(
        feedback_service_pb2.SubmitResponseRequest(
            name=response_name,
            invitation=invitation.name,
            answers=[
                survey_pb2.Answer(question="why", text="Setup took too long"),
                survey_pb2.Answer(question="csat", number=2),
            ],
            finish=True,
        )
    )
    assert done.completed
    assert done.answers[0].nps_category == survey_pb2.NPS_CATEGORY_DETRACTOR

    summary = feedback.GetSurveySummary(
        feedback_service_pb2.GetSurveySummaryRequest(survey=survey.name)
    )
    assert summary.responses == 1 and summary.completed_responses == 1
    assert summary.nps.detractors == 1 and summary.nps.score == -100.0
    assert summary.csat.answered == 1 and summary.csat.score == 0.0
    assert [q.question for q in summary.questions] == ["nps", "why", "csat"]
