"""Calls the loyalty service of a running `clm up` through stubs generated
from proto/: a customer enrols, a purchase recorded in the customer service
earns points, a reward is redeemed and its coupon used once."""

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
from clm.loyalty.v1 import loyalty_pb2, loyalty_service_pb2, loyalty_service_pb2_grpc

CUSTOMER = os.environ.get("CLM_CUSTOMER_ADDR", "127.0.0.1:50051")
HOST, PORT = CUSTOMER.rsplit(":", 1)
# `clm up --base-port P` puts loyalty on P+4 (run.sh passes the address
# `clm up --base-port 0` printed).
LOYALTY = os.environ.get("CLM_LOYALTY_ADDR", f"{HOST}:{int(PORT) + 4}")


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
    lo = ready(
        LOYALTY,
        lambda ch: loyalty_service_pb2_grpc.LoyaltyServiceStub(ch).ListRewards(
            loyalty_service_pb2.ListRewardsRequest(parent="programs/none"), timeout=5
        ),
    )
    yield (
        customer_service_pb2_grpc.CustomerServiceStub(c),
        loyalty_service_pb2_grpc.LoyaltyServiceStub(lo),
    )
    for ch in (c, lo):
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


def test_enrol_earn_from_a_purchase_redeem_and_use_the_coupon(stubs):
    customers, loyalty = stubs
    tag = uuid.uuid4().hex[:8]
    program = loyalty.CreateProgram(
        loyalty_service_pb2.CreateProgramRequest(
            program_id=f"py-{tag}",
            program=loyalty_pb2.Program(
                display_name="Python stars",
                earning_rules=[
                    loyalty_pb2.EarningRule(
                        id="purchase",
                        trigger=loyalty_pb2.EARNING_TRIGGER_PURCHASE,
                        currency_code="EUR",
                        points_per_unit=1,
                        unit_minor=100,
                    )
                ],
                expiry=loyalty_pb2.ExpiryPolicy(months_after_earning=12),
                tiers=[loyalty_pb2.Tier(id="base", threshold=0)],
                coupon_validity=duration_pb2.Duration(seconds=86400),
            ),
        )
    )
    c = customers.CreateCustomer(
        customer_service_pb2.CreateCustomerRequest(
            customer=customer_pb2.Customer(email=f"py-loyal-{tag}@example.com")
        )
    )
    member = loyalty.EnrollMember(
        loyalty_service_pb2.EnrollMemberRequest(program=program.name, customer=c.name)
    )
    assert member.tier == "base"
    assert member.balance == 0
    customers.RecordTouchpoints(
        customer_service_pb2.RecordTouchpointsRequest(
            touchpoints=[
                customer_pb2.Touchpoint(
                    customer=c.name,
                    event_id=f"py-buy-{tag}",
                    type=customer_pb2.TOUCHPOINT_TYPE_PURCHASE,
                    revenue=types_pb2.Money(currency_code="EUR", amount_minor=25_099),
                    occurred_time=timestamp_pb2.Timestamp(seconds=int(time.time())),
                )
            ]
        )
    )
    earned = eventually(
        lambda: (
            lambda m: m if m.balance == 250 else None
        )(loyalty.GetMember(loyalty_service_pb2.GetMemberRequest(name=member.name)))
    )
    assert earned.lifetime_earned == 250
    reward = loyalty.CreateReward(
        loyalty_service_pb2.CreateRewardRequest(
            parent=program.name,
            reward_id="mug",
            reward=loyalty_pb2.Reward(display_name="Mug", cost=200, stock=5, per_member_limit=1),
        )
    )
    redemption = loyalty.RedeemReward(
        loyalty_service_pb2.RedeemRewardRequest(
            member=member.name, reward=reward.name, request_id=f"py-redeem-{tag}"
        )
    )
    assert redemption.balance == 50
    assert sum(d.points for d in redemption.spend.draws) == 200
    code = redemption.coupon.code
    assert loyalty.ValidateCoupon(
        loyalty_service_pb2.ValidateCouponRequest(program=program.name, code=code)
    ).valid
    used = loyalty.UseCoupon(
        loyalty_service_pb2.UseCouponRequest(program=program.name, code=code, request_id=f"py-use-{tag}")
    )
    assert used.state == loyalty_pb2.COUPON_STATE_USED
    with pytest.raises(grpc.RpcError) as again:
        loyalty.UseCoupon(
            loyalty_service_pb2.UseCouponRequest(
                program=program.name, code=code, request_id=f"py-use2-{tag}"
            )
        )
    assert again.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert reason(again.value) == "COUPON_USED"
    # A second redemption is refused: the balance is short.
    with pytest.raises(grpc.RpcError) as short:
        loyalty.RedeemReward(
            loyalty_service_pb2.RedeemRewardRequest(
                member=member.name, reward=reward.name, request_id=f"py-redeem2-{tag}"
            )
        )
    assert short.value.code() in (
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )
