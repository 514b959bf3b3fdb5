"""grpcurl, a reflective client, against a running `clm up`: it learns the
API from server reflection alone (no .proto files) and renders an error's
google.rpc details as JSON, because reflection serves error_details.proto."""

import json
import os
import subprocess
import sys

ADDR = os.environ.get("CLM_CUSTOMER_ADDR", "127.0.0.1:50051")
GRPCURL = os.path.join(os.path.dirname(sys.executable), "grpcurl")


def grpcurl(*args):
    return subprocess.run(
        [GRPCURL, "-plaintext", *args], capture_output=True, text=True, timeout=60
    )


def test_grpcurl_lists_the_services_by_reflection():
    out = grpcurl(ADDR, "list")
    assert out.returncode == 0, out.stderr
    assert "clm.customer.v1.CustomerService" in out.stdout


def test_grpcurl_shows_a_bad_request_detail_as_json():
    body = json.dumps({"customer": {"email": "not-an-email"}})
    out = grpcurl("-d", body, ADDR, "clm.customer.v1.CustomerService/CreateCustomer")
    assert out.returncode != 0
    text = out.stdout + out.stderr
    assert "Code: InvalidArgument" in text, text
    detail = next(line for line in text.splitlines() if "google.rpc.BadRequest" in line)
    parsed = json.loads(detail[detail.index("{"):])
    assert parsed["@type"] == "type.googleapis.com/google.rpc.BadRequest"
    assert parsed["fieldViolations"][0]["field"] == "customer.email"
