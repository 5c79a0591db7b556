"""Our grpc_predict_v2.proto against the stock tritonclient's: same fields, numbers, types."""

from __future__ import annotations

from collections.abc import Callable

StockClient = Callable[..., list[dict]]

MESSAGES = [
    "ServerLiveRequest", "ServerLiveResponse", "ServerReadyRequest", "ServerReadyResponse",
    "ModelReadyRequest", "ModelReadyResponse", "ServerMetadataRequest", "ServerMetadataResponse",
    "ModelMetadataRequest", "ModelMetadataResponse", "ModelInferRequest", "ModelInferResponse",
    "ModelStreamInferResponse",
    "InferParameter", "InferTensorContents", "ModelRepositoryParameter",
    "RepositoryIndexRequest", "RepositoryIndexResponse", "RepositoryModelLoadRequest",
    "RepositoryModelLoadResponse", "RepositoryModelUnloadRequest",
    "RepositoryModelUnloadResponse", "ModelStatisticsRequest", "StatisticDuration",
    "InferStatistics", "InferResponseStatistics", "InferBatchStatistics", "MemoryUsage",
    "ModelStatistics", "ModelStatisticsResponse",
]
METHODS = ["ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata",
           "ModelInfer", "ModelStreamInfer", "RepositoryIndex", "RepositoryModelLoad",
           "RepositoryModelUnload", "ModelStatistics"]


def _describe(stock_client: StockClient, module: str) -> dict:
    call = {"op": "describe", "module": module, "service": "inference.GRPCInferenceService",
            "messages": MESSAGES, "methods": METHODS}
    return stock_client([call])[0]["value"]


def test_descriptors_match_tritonclient(stock_client: StockClient) -> None:
    # Each side in its own process: the two files cannot share a descriptor pool.
    ours = _describe(stock_client, "service.protocol.generated.grpc_predict_v2_pb2")
    theirs = _describe(stock_client, "tritonclient.grpc.service_pb2")
    assert ours["package"] == theirs["package"] == "inference"
    assert ours["service"] == theirs["service"]
    assert sorted(ours["methods"]) == sorted(METHODS)
    assert ours["methods"] == theirs["methods"]
    for name in MESSAGES:
        assert ours["messages"][name] == theirs["messages"][name], name
