"""`clm import` and `clm export` against a running `clm up`, as an analyst
runs them: customers from a CSV, touchpoints from JSON Lines naming the
customers by e-mail, then the members of a segment those customers fall in
exported as CSV and JSON Lines. run.sh passes the binary in
CLIENTS_CLM_BINARY."""

import csv
import json
import os
import subprocess
import time
import uuid

import grpc
import pytest

from clm.customer.v1 import customer_pb2, customer_service_pb2, customer_service_pb2_grpc
from clm.segmentation.v1 import segmentation_service_pb2, segmentation_service_pb2_grpc

CLM = os.environ.get("CLIENTS_CLM_BINARY")
CUSTOMER = os.environ.get("CLM_CUSTOMER_ADDR", "127.0.0.1:50051")
SEGMENTATION = os.environ.get("CLM_SEGMENTATION_ADDR", "127.0.0.1:50053")
URLS = ["--customer-url", f"http://{CUSTOMER}", "--segmentation-url", f"http://{SEGMENTATION}"]


def clm(*args):
    out = subprocess.run([CLM, *args, *URLS], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


@pytest.mark.skipif(not CLM, reason="run.sh passes the clm binary")
def test_import_customers_and_touchpoints_then_export_their_segment(tmp_path):
    tag = uuid.uuid4().hex[:8]
    segments = segmentation_service_pb2_grpc.SegmentationServiceStub(grpc.insecure_channel(SEGMENTATION))
    segment = segments.CreateSegment(
        segmentation_service_pb2.CreateSegmentRequest(
            segment=segmentation_service_pb2.Segment(
                display_name=f"Imported {tag}",
                owner="growth",
                rule_text=f'attributes.plan = "gold-{tag}"',
            ),
            request_id=f"cli-{tag}",
        )
    )
    people = tmp_path / "customers.csv"
    with people.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["E-Mail", "Name", "plan"])
        for i in range(50):
            w.writerow([f"cli-{tag}-{i}@example.com", f"Imported {i}", f"gold-{tag}"])
        w.writerow(["not-an-email", "Bad", f"gold-{tag}"])
    mapping = tmp_path / "mapping.csv"
    mapping.write_text("column,field\nE-Mail,email\nName,display_name\nplan,attributes.plan\n")
    summary = clm("import", "customers", str(people), "--mapping", str(mapping), "--batch-size", "20")
    assert "51 rows: 50 imported, 0 already there, 1 rejected" in summary, summary
    rejected = list(csv.reader((tmp_path / "customers.csv.rejected.csv").open()))
    assert rejected[1][0] == "51" and "customer.email" in rejected[1][1]

    events = tmp_path / "events.jsonl"
    with events.open("w") as f:
        for i in range(50):
            f.write(json.dumps({"email": f"cli-{tag}-{i}@example.com", "type": "feature_use",
                                "feature": "export", "occurred_time": "2026-01-05T10:00:00Z"}) + "\n")
    assert "50 rows: 50 imported" in clm("import", "touchpoints", str(events))
    (tmp_path / "events.jsonl.checkpoint").unlink()  # a re-run from scratch records nothing twice
    assert "50 rows: 0 imported, 50 already there" in clm("import", "touchpoints", str(events))
    customers = customer_service_pb2_grpc.CustomerServiceStub(grpc.insecure_channel(CUSTOMER))
    ada = customers.LookupCustomer(customer_service_pb2.LookupCustomerRequest(
        identifier=customer_pb2.CustomerIdentifier(
            type=customer_pb2.IDENTIFIER_TYPE_EMAIL, value=f"cli-{tag}-0@example.com")))
    timeline = customers.ListTouchpoints(customer_service_pb2.ListTouchpointsRequest(parent=ada.name))
    assert [t.feature for t in timeline.touchpoints] == ["export"]

    deadline = time.time() + 30
    while segments.GetSegment(segmentation_service_pb2.GetSegmentRequest(name=segment.name)).member_count < 50:
        assert time.time() < deadline, "the imported customers did not enter the segment"
        time.sleep(0.2)
    out = tmp_path / "members.csv"
    clm("export", "segment", segment.name, "-o", str(out))
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 50 and all(r["customer"].startswith("customers/") for r in rows)
    lines = clm("export", "segment", segment.name.split("/")[1], "--format", "jsonl").splitlines()
    assert sorted(json.loads(line)["customer"] for line in lines) == sorted(r["customer"] for r in rows)
