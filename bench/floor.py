"""The Python gRPC floor: the least any Python KServe v2 server can do per request.

    .venv/bin/python bench/floor.py --port 8001 [--loop uvloop]

A bare grpc.aio servicer for `inference.GRPCInferenceService`: ModelInfer parses the
request and answers with its input tensors echoed back as outputs (raw bytes, no model,
no checks, no batching, no metrics); ModelReady says ready to anything. Server CPU per
request here is the reference the front end's cost is measured against (bench/frontend.py).
`--loop` picks the event loop: asyncio's own (the default), or uvloop's, which Tapserve
runs on by default.
"""

from __future__ import annotations

import argparse
import asyncio

import grpc

from service.protocol.generated import grpc_predict_v2_pb2 as pb

SERVICE = "inference.GRPCInferenceService"


async def model_infer(request: pb.ModelInferRequest,
                      context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
    return pb.ModelInferResponse(
        model_name=request.model_name, id=request.id,
        outputs=[pb.ModelInferResponse.InferOutputTensor(
            name=t.name, datatype=t.datatype, shape=t.shape) for t in request.inputs],
        raw_output_contents=request.raw_input_contents)


async def model_ready(request: pb.ModelReadyRequest,
                      context: grpc.aio.ServicerContext) -> pb.ModelReadyResponse:
    return pb.ModelReadyResponse(ready=True)


async def serve(host: str, port: int) -> None:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, {
        "ModelInfer": grpc.unary_unary_rpc_method_handler(
            model_infer, pb.ModelInferRequest.FromString,
            pb.ModelInferResponse.SerializeToString),
        "ModelReady": grpc.unary_unary_rpc_method_handler(
            model_ready, pb.ModelReadyRequest.FromString,
            pb.ModelReadyResponse.SerializeToString)})])
    server.add_insecure_port(f"{host}:{port}")
    await server.start()
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    args = parser.parse_args()
    factory = None
    if args.loop == "uvloop":
        import uvloop
        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
