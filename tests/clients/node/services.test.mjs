// Calls every service of a running `clm up` (CLM_*_ADDR, set by run.sh) with
// @grpc/grpc-js, loading the service definitions from proto/: scoring and
// segmentation follow a touchpoint, feedback runs a survey to its summary,
// loyalty earns on a purchase and redeems a reward; each service's bad
// input comes back INVALID_ARGUMENT with a decoded BadRequest naming the field.
import { test } from "node:test";
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { fileURLToPath } from "node:url";
import path from "node:path";
import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";
import protobuf from "protobufjs";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../../proto");
const def = protoLoader.loadSync(
  [
    "clm/customer/v1/customer_service.proto",
    "clm/scoring/v1/scoring_service.proto",
    "clm/segmentation/v1/segmentation_service.proto",
    "clm/feedback/v1/feedback_service.proto",
    "clm/loyalty/v1/loyalty_service.proto",
  ],
  { includeDirs: [root], keepCase: true, longs: String, enums: String, defaults: true, oneofs: true },
);
const pkg = grpc.loadPackageDefinition(def);
const clm = pkg.clm;
const base = process.env.CLM_CUSTOMER_ADDR ?? "127.0.0.1:50051";
const [host, port] = [base.slice(0, base.lastIndexOf(":")), Number(base.slice(base.lastIndexOf(":") + 1))];
const addr = (name, offset) => process.env[`CLM_${name}_ADDR`] ?? `${host}:${port + offset}`;
const insecure = grpc.credentials.createInsecure();
const stubs = {
  customer: new clm.customer.v1.CustomerService(addr("CUSTOMER", 0), insecure),
  scoring: new clm.scoring.v1.ScoringService(addr("SCORING", 1), insecure),
  segmentation: new clm.segmentation.v1.SegmentationService(addr("SEGMENTATION", 2), insecure),
  feedback: new clm.feedback.v1.FeedbackService(addr("FEEDBACK", 3), insecure),
  loyalty: new clm.loyalty.v1.LoyaltyService(addr("LOYALTY", 4), insecure),
};
const call = (service, method, request) =>
  new Promise((resolve, reject) =>
    stubs[service][method](request, { deadline: Date.now() + 10_000, waitForReady: true }, (err, res) =>
      err ? reject(err) : resolve(res),
    ),
  );
// Services follow each other's change streams: what one records, another
// sees a moment later.
const eventually = async (what, check) => {
  const deadline = Date.now() + 30_000;
  for (;;) {
    const value = await check().catch(() => undefined);
    if (value) return value;
    if (Date.now() > deadline) assert.fail(`${what}: not in time`);
    await new Promise((r) => setTimeout(r, 100));
  }
};
// The BadRequest field paths of an INVALID_ARGUMENT error, decoded from the
// grpc-status-details-bin trailer (google.rpc.Status with Any details).
const types = new protobuf.Root();
types.resolvePath = (_origin, target) => path.join(root, target);
types.loadSync(["google/rpc/status.proto", "google/rpc/error_details.proto"], { keepCase: true });
types.resolveAll();
const badFields = (err) => {
  assert.equal(err.code, grpc.status.INVALID_ARGUMENT, `want INVALID_ARGUMENT, got ${err.code}: ${err.details}`);
  const raw = err.metadata.get("grpc-status-details-bin")[0];
  assert.ok(raw, "the error carries grpc-status-details-bin");
  const status = types.lookupType("google.rpc.Status").decode(raw);
  const fields = [];
  for (const any of status.details) {
    if (any.type_url === "type.googleapis.com/google.rpc.BadRequest") {
      const bad = types.lookupType("google.rpc.BadRequest").decode(any.value);
      fields.push(...bad.field_violations.map((v) => v.field));
    }
  }
  return fields;
};
const refused = async (promise) => {
  try {
    await promise;
  } catch (err) {
    return badFields(err);
  }
  assert.fail("the call was accepted");
};
const now = () => ({ seconds: String(Math.floor(Date.now() / 1000)), nanos: 0 });

test("scoring and segmentation: a scored touchpoint puts the customer in a segment", async () => {
  const tag = randomUUID().slice(0, 8);
  const model = await call("scoring", "CreateScoringModel", {
    scoring_model_id: `node-${tag}`,
    scoring_model: {
      display_name: "Node leads",
      rules: [{ id: "exports", score: "engagement", points: 10, touchpoint: 'feature_use where feature = "export"' }],
    },
    request_id: `node-model-${tag}`,
  });
  const segment = await call("segmentation", "CreateSegment", {
    segment: { display_name: `Node engaged ${tag}`, owner: "growth", rule_text: `score("node-${tag}").engagement >= 10` },
    request_id: `node-segment-${tag}`,
  });
  const c = await call("customer", "CreateCustomer", { customer: { email: `node-score-${tag}@example.com` } });
  await call("customer", "RecordTouchpoints", {
    touchpoints: [
      { customer: c.name, event_id: `node-export-${tag}`, type: "TOUCHPOINT_TYPE_FEATURE_USE", feature: "export", occurred_time: now() },
    ],
  });
  await eventually("engagement 10", async () => {
    const s = await call("scoring", "GetScore", { customer: c.name, scoring_model: model.name });
    return s.scores.some((v) => v.score === "engagement" && v.value === 10);
  });
  await eventually("segment membership", async () =>
    (await call("segmentation", "IsMember", { segment: segment.name, customer: c.name })).member,
  );
  const mine = await call("segmentation", "GetCustomerSegments", { customer: c.name });
  assert.ok(mine.segments.includes(segment.name));

  assert.deepEqual(
    await refused(call("segmentation", "CreateSegment", { segment: { display_name: "Broken", owner: "growth", rule_text: "age >= " } })),
    ["segment.rule_text"],
  );
  const scoringFields = await refused(
    call("scoring", "CreateScoringModel", {
      scoring_model_id: `node-bad-${tag}`,
      scoring_model: { display_name: "Bad", rules: [{ id: "x", score: "engagement", points: 1, touchpoint: "feature_use where" }] },
    }),
  );
  assert.ok(scoringFields.some((f) => f.startsWith("scoring_model.rules[0]")), scoringFields.join());
});

test("feedback: a survey from creation to its summary", async () => {
  const tag = randomUUID().slice(0, 8);
  const who = await call("customer", "CreateCustomer", { customer: { email: `node-survey-${tag}@example.com` } });
  await call("customer", "SetConsent", {
    name: `${who.name}/consent`,
    settings: [{ purpose: "CONSENT_PURPOSE_SURVEYS", channel: "CONSENT_CHANNEL_EMAIL", state: "CONSENT_STATE_GRANTED" }],
    source: "CONSENT_SOURCE_API",
    request_id: `node-consent-${tag}`,
  });
  const survey = await call("feedback", "CreateSurvey", {
    survey_id: `node-${tag}`,
    survey: {
      display_name: "After onboarding",
      questions: [{ id: "nps", kind: "QUESTION_KIND_NPS", text: { en: "How likely are you to recommend us?" }, required: true }],
    },
  });
  assert.equal(survey.state, "SURVEY_STATE_DRAFT");
  await call("feedback", "PublishSurvey", { name: survey.name });
  const invitation = await eventually("an invitation under the consent", async () => {
    const out = await call("feedback", "CreateInvitations", {
      survey: survey.name,
      customers: [who.name],
      channel: "CONSENT_CHANNEL_EMAIL",
    });
    return out.invitations[0];
  });
  const response = `${survey.name}/responses/r-${tag}`;
  assert.deepEqual(
    await refused(call("feedback", "SubmitResponse", { name: response, invitation: invitation.name, answers: [{ question: "nps", number: 11 }] })),
    ["answers[0]"],
  );
  const done = await call("feedback", "SubmitResponse", {
    name: response,
    invitation: invitation.name,
    answers: [{ question: "nps", number: 10 }],
    finish: true,
  });
  assert.ok(done.completed);
  const summary = await call("feedback", "GetSurveySummary", { survey: survey.name });
  assert.equal(Number(summary.completed_responses), 1);
  assert.equal(Number(summary.nps.promoters), 1);
  assert.equal(summary.nps.score, 100);
});

test("loyalty: a purchase earns points, a reward is redeemed and its coupon used", async () => {
  const tag = randomUUID().slice(0, 8);
  const program = await call("loyalty", "CreateProgram", {
    program_id: `node-${tag}`,
    program: {
      display_name: "Node stars",
      earning_rules: [{ id: "purchase", trigger: "EARNING_TRIGGER_PURCHASE", currency_code: "EUR", points_per_unit: 1, unit_minor: 100 }],
      expiry: { months_after_earning: 12 },
      tiers: [{ id: "base", threshold: 0 }],
    },
  });
  const c = await call("customer", "CreateCustomer", { customer: { email: `node-loyal-${tag}@example.com` } });
  const member = await call("loyalty", "EnrollMember", { program: program.name, customer: c.name });
  await call("customer", "RecordTouchpoints", {
    touchpoints: [
      {
        customer: c.name,
        event_id: `node-buy-${tag}`,
        type: "TOUCHPOINT_TYPE_PURCHASE",
        revenue: { currency_code: "EUR", amount_minor: 25_099 },
        occurred_time: now(),
      },
    ],
  });
  await eventually("250 points", async () => (await call("loyalty", "GetMember", { name: member.name })).balance === "250");
  const reward = await call("loyalty", "CreateReward", {
    parent: program.name,
    reward_id: "mug",
    reward: { display_name: "Mug", cost: 200, stock: 5, per_member_limit: 1 },
  });
  const redemption = await call("loyalty", "RedeemReward", { member: member.name, reward: reward.name, request_id: `node-redeem-${tag}` });
  assert.equal(redemption.balance, "50");
  const used = await call("loyalty", "UseCoupon", { program: program.name, code: redemption.coupon.code, request_id: `node-use-${tag}` });
  assert.ok(used);
  const fields = await refused(
    call("loyalty", "CreateReward", { parent: program.name, reward_id: "bad", reward: { display_name: "Bad", cost: -1 } }),
  );
  assert.ok(fields.length > 0 && fields[0].startsWith("reward."), fields.join());
});
