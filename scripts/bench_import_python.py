"""The reference for `clm import customers` (`scripts/bench.sh --only import`): the
same file sent as the same batches by the Python client (grpcio stubs
generated from proto/): BatchCreateCustomers of BATCH rows with a request id
per batch, CONCURRENCY batches in flight. Prints the rows/s.

Usage: bench_import_python.py FILE ADDR BATCH CONCURRENCY"""

import csv
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
from clm.common.v1 import types_pb2
from clm.customer.v1 import customer_pb2, customer_service_pb2, customer_service_pb2_grpc

path, addr, batch, concurrency = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
stub = customer_service_pb2_grpc.CustomerServiceStub(grpc.insecure_channel(addr))


def request(row):
    year, month, day = (int(x) for x in row["birth_date"].split("-"))
    return customer_service_pb2.CreateCustomerRequest(
        customer=customer_pb2.Customer(
            email=row["email"],
            display_name=row["display_name"],
            demographics=customer_pb2.Demographics(
                birth_date=types_pb2.Date(year=year, month=month, day=day)
            ),
            attributes={"plan": customer_pb2.AttributeValue(string_value=row["attributes.plan"])},
        )
    )


def batches():
    with open(path, newline="") as f:
        rows = []
        for n, row in enumerate(csv.DictReader(f), 1):
            rows.append(request(row))
            if len(rows) == batch:
                yield n, rows
                rows = []
        if rows:
            yield n, rows


def send(item):
    n, rows = item
    answer = stub.BatchCreateCustomers(
        customer_service_pb2.BatchCreateCustomersRequest(requests=rows, request_id=f"py-bench-{n}"),
        timeout=120,
    )
    return len(answer.customers)


start = time.monotonic()
with ThreadPoolExecutor(concurrency) as pool:
    created = sum(pool.map(send, batches()))
elapsed = time.monotonic() - start
print(f"python: {created} customers in {elapsed:.1f} s: {created / elapsed:.0f} rows/s")
