// Calls a running `clm up` (CLM_CUSTOMER_ADDR) with @grpc/grpc-js, loading
// the service definitions from proto/ with @grpc/proto-loader.
import { test } from "node:test";
import assert from "node:assert/strict";
import { fileURLToPath } from "node:url";
import path from "node:path";
import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../../proto");
const def = protoLoader.loadSync(
  ["clm/customer/v1/customer_service.proto", "clm/common/v1/changes.proto"],
  { includeDirs: [root], keepCase: true, longs: String, enums: String, defaults: true, oneofs: true },
);
const clm = grpc.loadPackageDefinition(def).clm;
const addr = process.env.CLM_CUSTOMER_ADDR ?? "127.0.0.1:50051";
const customers = new clm.customer.v1.CustomerService(addr, grpc.credentials.createInsecure());

const call = (method, request) =>
  new Promise((resolve, reject) => customers[method](request, (err, res) => (err ? reject(err) : resolve(res))));

test("create a customer, record touchpoints and read the timeline", async () => {
  const email = `node-${Date.now()}@example.com`;
  const c = await call("CreateCustomer", { customer: { email, display_name: "Node" }, request_id: `node-${email}` });
  assert.match(c.name, /^customers\//);
  assert.equal(c.stage, "STAGE_APPROACH");

  const touchpoints = [0, 1, 2].map((i) => ({
    customer: c.name,
    event_id: `${c.name}-node-${i}`,
    type: "TOUCHPOINT_TYPE_PURCHASE",
    revenue: { currency_code: "EUR", amount_minor: 1000 + i },
    occurred_time: { seconds: String(1_760_000_000 + i), nanos: 0 },
  }));
  const first = await call("RecordTouchpoints", { touchpoints });
  assert.equal(first.recorded_count, 3);
  const again = await call("RecordTouchpoints", { touchpoints });
  assert.equal(again.duplicate_count, 3);

  const page = await call("ListTouchpoints", { parent: c.name, page_size: 10 });
  assert.deepEqual(page.touchpoints.map((t) => t.revenue.amount_minor), ["1002", "1001", "1000"]);
});

test("bad input is INVALID_ARGUMENT", async () => {
  await assert.rejects(call("ListCustomers", { page_size: -1 }), (err) => err.code === grpc.status.INVALID_ARGUMENT);
});
