"""TensorFlow Serving's gRPC API: PredictionService and ModelService, over the data plane.

Convert, call the data plane, convert back. `model_spec.signature_name` names an endpoint
("" or "serving_default": the default one); `output_filter` names outputs or taps. The
messages are generated from protos/tf_serving_apis.proto (no TensorFlow needed).
"""

from __future__ import annotations

from collections.abc import Mapping

from service.errors import InvalidInput, NotFound, Unsupported, clip
from service.protocol import convert
from service.protocol.generated import tf_error_codes_pb2 as codes_pb2
from service.protocol.generated import tf_framework_pb2 as framework_pb2
from service.protocol.generated import tf_serving_apis_pb2 as apis_pb2
from service.protocol.generated.tf_serving_apis_pb2_grpc import (
    ModelServiceServicer,
    PredictionServiceServicer,
)
from service.protocol.kserve import Context, deadline_of, decoded
from service.protocol.tensorproto import data_type, from_numpy, shape_proto, to_numpy
from service.tracing import NO_TRACING, RequestTrace, Tracing
from service.types import DataPlane, EndpointMetadata, InferRequest, TensorSpec

DEFAULT_SIGNATURE = "serving_default"
PREDICT_METHOD = "tensorflow/serving/predict"
PROTOCOL = "tfserving_grpc"
PROTOCOL_REST = "tfserving_http"

_STATES = {  # the registry's states as TF Serving's ModelVersionStatus.State
    "READY": apis_pb2.ModelVersionStatus.AVAILABLE,
    "LOADING": apis_pb2.ModelVersionStatus.LOADING,
    "UNLOADING": apis_pb2.ModelVersionStatus.UNLOADING,
    "UNAVAILABLE": apis_pb2.ModelVersionStatus.END,
}


def model_and_version(spec: apis_pb2.ModelSpec) -> tuple[str, str | None]:
    """The model name and the version (number or label) a ModelSpec asks for."""
    model, endpoint = convert.parse_model_name(spec.name)
    if endpoint is not None:
        raise NotFound(f"no model {clip(spec.name)}: name the model alone and the endpoint in "
                       "model_spec.signature_name")
    if spec.HasField("version"):
        return model, convert.parse_version(str(spec.version.value))
    return model, convert.parse_version(spec.version_label) if spec.version_label else None


def endpoint_of(signature_name: str) -> str | None:
    return None if signature_name in ("", DEFAULT_SIGNATURE) else signature_name


def predict_target(msg: apis_pb2.PredictRequest) -> tuple[str, str | None, str | None]:
    """The (model, endpoint, version) a PredictRequest asks for; raises NotFound."""
    model, version = model_and_version(msg.model_spec)
    endpoint = endpoint_of(msg.model_spec.signature_name)
    if endpoint is not None:
        convert.parse_model_name(f"{model}.{endpoint}")  # NotFound for an impossible name
    return model, endpoint, version


def decode_predict(msg: apis_pb2.PredictRequest, deadline: float | None = None,
                   specs: Mapping[str, TensorSpec] | None = None,
                   max_rows: int | None = None) -> InferRequest:
    """A PredictRequest as an InferRequest; with `specs` (the endpoint's inputs by name)
    the dtypes and shapes are checked before any tensor is read, and with
    `max_rows` the rows."""
    model, endpoint, version = predict_target(msg)
    convert.check_counts(len(msg.inputs), len(msg.output_filter))
    outputs = list(msg.output_filter)
    if len(set(outputs)) != len(outputs):
        raise InvalidInput(f"output_filter names an output more than once: {clip(outputs)}")
    inputs = {name: to_numpy(name, tensor, specs, max_rows)
              for name, tensor in msg.inputs.items()}
    return InferRequest(model, inputs, endpoint, version, outputs, deadline=deadline)


def signature_def(meta: EndpointMetadata) -> framework_pb2.SignatureDef:
    def info(spec: TensorSpec) -> framework_pb2.TensorInfo:
        return framework_pb2.TensorInfo(name=spec.name, dtype=data_type(spec.dtype),
                                         tensor_shape=shape_proto(spec.shape))
    return framework_pb2.SignatureDef(
        inputs={s.name: info(s) for s in meta.inputs},
        outputs={s.name: info(s) for s in meta.outputs}, method_name=PREDICT_METHOD)


class PredictionServicer(PredictionServiceServicer):
    """tensorflow.serving.PredictionService for a grpc.aio server."""

    def __init__(self, dataplane: DataPlane, tracing: Tracing = NO_TRACING) -> None:
        self._dataplane = dataplane
        self._tracing = tracing

    async def Predict(self, request: apis_pb2.PredictRequest,
                      context: Context) -> apis_pb2.PredictResponse:
        with self._tracing.request(PROTOCOL, request.model_spec.name, context) as trace:
            return await self._predict(request, context, trace)

    async def _predict(self, request: apis_pb2.PredictRequest,
                       context: Context, trace: RequestTrace
                       ) -> apis_pb2.PredictResponse:
        names = request.model_spec
        with self._dataplane.call(PROTOCOL, names.name, endpoint_of(names.signature_name)
                                  ) as call:
            # The endpoint first: its dtypes are checked before any tensor is read.
            target = call.resolve(*predict_target(request))
            infer_request = await decoded(
                decode_predict, request, deadline_of(context), target.inputs, target.max_rows,
                elements=convert.declared_elements(
                    [d.size for d in t.tensor_shape.dim] for t in request.inputs.values()))
            response = await call.infer(infer_request)
            trace.answered(response)
            # version as a dict: the field takes tf_pool's Int64Value, not wrappers_pb2's.
            spec = apis_pb2.ModelSpec(
                name=response.model, version={"value": response.version},
                signature_name=request.model_spec.signature_name or DEFAULT_SIGNATURE)
            return apis_pb2.PredictResponse(model_spec=spec, outputs={
                name: from_numpy(array) for name, array in response.outputs.items()})

    async def GetModelMetadata(
        self, request: apis_pb2.GetModelMetadataRequest,
        context: Context,
    ) -> apis_pb2.GetModelMetadataResponse:
        unsupported = [f for f in request.metadata_field if f != "signature_def"]
        if unsupported or not request.metadata_field:
            raise InvalidInput(f"metadata_field must be ['signature_def'], got "
                               f"{list(request.metadata_field)}")
        model, version = model_and_version(request.model_spec)
        number, default, endpoints = self._dataplane.model_endpoints(model, version)
        signatures = {meta.endpoint: signature_def(meta) for meta in endpoints}
        signatures[DEFAULT_SIGNATURE] = signatures[default]
        response = apis_pb2.GetModelMetadataResponse(
            model_spec=apis_pb2.ModelSpec(name=model, version={"value": number}))
        response.metadata["signature_def"].Pack(
            apis_pb2.SignatureDefMap(signature_def=signatures))
        return response

    async def Classify(self, request: object, context: Context) -> None:
        raise Unsupported("Classify is not served: Tapserve serves Predict (a classifier's "
                          "scores are an output or a tap of Predict)")

    async def Regress(self, request: object, context: Context) -> None:
        raise Unsupported("Regress is not served: Tapserve serves Predict")

    async def MultiInference(self, request: object, context: Context) -> None:
        raise Unsupported("MultiInference is not served: Tapserve serves Predict; several "
                          "outputs or taps of one model come from one Predict's output_filter")


class ModelStatusServicer(ModelServiceServicer):
    """tensorflow.serving.ModelService: GetModelStatus (reloading config is not served)."""

    def __init__(self, dataplane: DataPlane) -> None:
        self._dataplane = dataplane

    async def GetModelStatus(
        self, request: apis_pb2.GetModelStatusRequest,
        context: Context,
    ) -> apis_pb2.GetModelStatusResponse:
        model, version = model_and_version(request.model_spec)
        statuses = self._dataplane.model_status(model, version)
        return apis_pb2.GetModelStatusResponse(model_version_status=[
            apis_pb2.ModelVersionStatus(
                version=number, state=_STATES[state],
                status=_status(reason if state != "READY" else ""))
            for number, state, reason in statuses])

    async def HandleReloadConfigRequest(self, request: object,
                                        context: Context) -> None:
        raise Unsupported("HandleReloadConfigRequest is not served: Tapserve follows its model "
                          "repository (--model-control-mode poll) or the repository API")


def _status(reason: str) -> apis_pb2.StatusProto:
    return apis_pb2.StatusProto(error_code=codes_pb2.UNKNOWN if reason else codes_pb2.OK,
                                error_message=reason)
