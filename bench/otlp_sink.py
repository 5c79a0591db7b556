"""A bare OTLP/HTTP trace receiver for benchmarks: answers every POST 200 and counts the
spans, so a server with --otlp-endpoint pays for exporting without a collector's cost.

    .venv/bin/python bench/otlp_sink.py 4318 &
    .venv/bin/python bench/ab.py --scenario 2 --b "--otlp-endpoint http://127.0.0.1:4318"
"""

from __future__ import annotations

import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest


class Sink(BaseHTTPRequestHandler):
    spans = 0

    def do_POST(self) -> None:
        message = ExportTraceServiceRequest.FromString(
            self.rfile.read(int(self.headers["Content-Length"])))
        Sink.spans += sum(len(s.spans) for r in message.resource_spans for s in r.scope_spans)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


if __name__ == "__main__":
    server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1]) if len(sys.argv) > 1 else 4318),
                                 Sink)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print(f"otlp_sink: {Sink.spans} spans received")
