"""Traces across processes: the router and a worker export their spans over OTLP/gRPC to a
receiver run here (opentelemetry-proto's TraceService), and one request's spans join its
client's trace: the router's `route` span is a child of the client's `traceparent`, sent as an
HTTP header (the official OpenAI client) or as gRPC metadata, and the worker's `request` span a
child of the router's. A request without one gets a trace of its own, shared by both.

  python tests/openai/check_tracing.py --bin-dir target/debug
"""

import argparse
import pathlib
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from concurrent import futures

import grpc
import openai
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
import grpc_stubs  # noqa: E402
from check_client import MODEL, check, free_port, wait_ready  # noqa: E402  (this directory)


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """Keeps every exported span as (service, name, trace id, span id, parent span id, the
    span ids it links to)."""

    def __init__(self):
        self.spans = []
        self.lock = threading.Lock()

    def Export(self, request, context):
        with self.lock:
            for resource_spans in request.resource_spans:
                service = next((a.value.string_value for a in resource_spans.resource.attributes
                                if a.key == "service.name"), "")
                for scope in resource_spans.scope_spans:
                    for span in scope.spans:
                        self.spans.append((service, span.name, span.trace_id.hex(), span.span_id.hex(),
                                           span.parent_span_id.hex(), {link.span_id.hex() for link in span.links}))
        return trace_service_pb2.ExportTraceServiceResponse()

    def of_trace(self, trace_id):
        with self.lock:
            return [s for s in self.spans if s[2] == trace_id]


def spans_joined(receiver, trace_id, client_span, what, deadline_s=30):
    """Waits for the router's and the worker's spans of `trace_id` and checks their parents."""
    deadline = time.time() + deadline_s
    while True:
        spans = receiver.of_trace(trace_id)
        route = [s for s in spans if s[0] == "deepseek-router" and s[1] == "route"]
        request = [s for s in spans if s[0] == "deepseek-worker" and s[1] == "request"]
        if route and request:
            break
        if time.time() > deadline:
            raise SystemExit(f"FAILED: {what}: spans of trace {trace_id}: {spans}")
        time.sleep(0.2)
    if client_span is None:
        check(len(route) == 1 and route[0][4] == "", f"{what}: the router's span starts the trace")
    else:
        check(len(route) == 1 and route[0][4] == client_span, f"{what}: the router's span continues the client's")
    check(len(request) == 1 and request[0][4] == route[0][3], f"{what}: the worker's span is the router's child")
    return request[0]


def steps_linked(receiver, request, wanted, deadline_s=30):
    """The worker's scheduler steps that served `request` (spans of their own traces, linked
    to it), once `wanted` have come or the deadline passed."""
    deadline = time.time() + deadline_s
    while True:
        with receiver.lock:
            steps = [s for s in receiver.spans
                     if s[0] == "deepseek-worker" and s[1] == "step" and request[3] in s[5]]
        if len(steps) >= wanted or time.time() > deadline:
            return steps
        time.sleep(0.2)


def traceparent():
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return trace_id, span_id, f"00-{trace_id}-{span_id}-01"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bin-dir", default=str(ROOT / "target/debug"))
    args = parser.parse_args()
    bin_dir = pathlib.Path(args.bin_dir)
    receiver = Receiver()
    collector = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, collector)
    otlp_port = collector.add_insecure_port("127.0.0.1:0")
    collector.start()
    otlp = ["--otlp-endpoint", f"http://127.0.0.1:{otlp_port}"]
    worker_port, grpc_port, http_port = free_port(), free_port(), free_port()
    procs = [
        subprocess.Popen([bin_dir / "deepseek-worker", "serve", "--listen", f"127.0.0.1:{worker_port}", *otlp],
                         cwd=ROOT),
        subprocess.Popen([bin_dir / "deepseek-router", "--grpc-listen", f"127.0.0.1:{grpc_port}",
                          "--http-listen", f"127.0.0.1:{http_port}", "--metrics-listen", "",
                          "--backend", f"pool=cpu,addr=127.0.0.1:{worker_port}", "--health-interval-ms", "100",
                          *otlp], cwd=ROOT),
    ]
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="none", max_retries=0)
        wait_ready(client)

        trace_id, span_id, header = traceparent()
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                       extra_headers={"traceparent": header})
        request = spans_joined(receiver, trace_id, span_id, "OpenAI client over HTTP")
        steps = steps_linked(receiver, request, 4)
        # A prompt pass, then one pass per token but the last (it is sampled from the one
        # before): 4 steps for 4 tokens.
        check(len(steps) == 4 and all(s[2] != trace_id and s[4] == "" for s in steps),
              f"the worker's scheduler steps are spans of their own, linked to the request ({len(steps)})")

        pb, pb_grpc = grpc_stubs.generate(tempfile.mkdtemp())
        trace_id, span_id, header = traceparent()
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            request = pb.GenerateRequest(text="Hello", stopping=pb.StoppingCriteria(max_new_tokens=4))
            list(pb_grpc.InferenceStub(channel).Generate(request, timeout=30, metadata=[("traceparent", header)]))
        spans_joined(receiver, trace_id, span_id, "gRPC client")

        before = {s[2] for s in receiver.spans}
        client.completions.create(model=MODEL, prompt="The operator", max_tokens=2)
        deadline = time.time() + 30
        while not (new := {s[2] for s in receiver.spans if s[1] == "route"} - before) and time.time() < deadline:
            time.sleep(0.2)
        check(len(new) == 1, "a request without traceparent starts one trace")
        spans_joined(receiver, new.pop(), None, "a request without traceparent")
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=30)
        collector.stop(None)


if __name__ == "__main__":
    main()
