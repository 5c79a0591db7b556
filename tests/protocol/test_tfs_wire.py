"""Our TF Serving protobufs (protos/tf_*.proto) against tensorflow-serving-api's and
TensorFlow's own: the same names, numbers, types and enums for every field we keep, and
the same bytes both ways. Both live in one process: ours build into tf_pool.POOL, theirs
into protobuf's default pool."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import pytest

pytest.importorskip("tensorflow_serving", reason="tensorflow-serving-api is not installed: "
                    "nothing to check our TF Serving protobufs against")

import tensorflow as tf  # noqa: E402
from echo_dataplane import EchoDataPlane  # noqa: E402
from google.protobuf import descriptor_pool, message_factory  # noqa: E402
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor  # noqa: E402
from google.protobuf.message import Message  # noqa: E402
from tensorflow_serving.apis import (  # noqa: E402
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    model_management_pb2,
    model_service_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
)
from test_tensorproto import SAMPLES as SERVED  # noqa: E402  # the dtypes Tapserve serves

from service.protocol.generated import (  # noqa: E402
    tf_error_codes_pb2,
    tf_framework_pb2,
    tf_serving_apis_pb2,
    tf_serving_apis_pb2_grpc,
)
from service.protocol.generated.tf_pool import POOL  # noqa: E402
from service.protocol.tensorproto import from_numpy, to_numpy  # noqa: E402
from service.protocol.tfserving import (  # noqa: E402
    ModelStatusServicer,
    PredictionServicer,
    signature_def,
)
from service.types import EndpointMetadata, TensorSpec  # noqa: E402

OURS = (tf_framework_pb2, tf_error_codes_pb2, tf_serving_apis_pb2)
# Fields of theirs we leave out (reserved in ours): Tapserve never reads or writes them.
OMITTED = {
    "tensorflow.TensorProto": {"resource_handle_val", "variant_val"},
    "tensorflow.TensorInfo": {"coo_sparse", "composite_tensor"},
    "tensorflow.serving.PredictRequest": {"predict_streamed_options", "client_id",
                                          "request_options"},
}
# The messages of the methods Tapserve answers UNIMPLEMENTED: TF Serving's names, no fields.
PLACEHOLDERS = {f"tensorflow.serving.{name}{kind}" for name in (
    "Classification", "Regression", "MultiInference", "ReloadConfig")
    for kind in ("Request", "Response")}
# Their files, loaded (with everything they import) by the imports above.
assert prediction_service_pb2 and model_service_pb2
THEIRS = descriptor_pool.Default()


def _messages(descriptors: Any) -> list[Descriptor]:
    """Every message, nested ones included (map entries too)."""
    found = []
    for message in descriptors:
        found.append(message)
        found.extend(_messages(message.nested_types))
    return found


def _enums(messages: list[Descriptor]) -> list[EnumDescriptor]:
    top = [e for module in OURS for e in module.DESCRIPTOR.enum_types_by_name.values()]
    return top + [e for m in messages for e in m.enum_types]


OUR_MESSAGES = _messages(m for module in OURS
                         for m in module.DESCRIPTOR.message_types_by_name.values())


def _facts(field: FieldDescriptor) -> dict[str, Any]:
    return {
        "number": field.number, "type": field.type, "repeated": field.is_repeated,
        "packed": field.is_packed, "presence": field.has_presence, "json": field.json_name,
        "message": field.message_type.full_name if field.message_type else None,
        "enum": field.enum_type.full_name if field.enum_type else None,
        "oneof": field.containing_oneof.name if field.containing_oneof else None,
    }


def test_every_generated_message_is_checked_here() -> None:
    top = {m.full_name for m in OUR_MESSAGES if not m.GetOptions().map_entry
           and m.containing_type is None}
    assert top - PLACEHOLDERS == {
        "tensorflow.TensorShapeProto", "tensorflow.TensorProto", "tensorflow.TensorInfo",
        "tensorflow.SignatureDef", "tensorflow.serving.ModelSpec",
        "tensorflow.serving.StatusProto", "tensorflow.serving.PredictRequest",
        "tensorflow.serving.PredictResponse", "tensorflow.serving.SignatureDefMap",
        "tensorflow.serving.GetModelMetadataRequest",
        "tensorflow.serving.GetModelMetadataResponse",
        "tensorflow.serving.GetModelStatusRequest", "tensorflow.serving.ModelVersionStatus",
        "tensorflow.serving.GetModelStatusResponse"}
    assert top >= PLACEHOLDERS


@pytest.mark.parametrize("ours", OUR_MESSAGES, ids=lambda m: m.full_name)
def test_message_matches_theirs(ours: Descriptor) -> None:
    theirs = THEIRS.FindMessageTypeByName(ours.full_name)
    assert ours.GetOptions().map_entry == theirs.GetOptions().map_entry
    if ours.full_name in PLACEHOLDERS:
        assert not ours.fields
        return
    left_out = {f.name for f in theirs.fields} - {f.name for f in ours.fields}
    assert left_out == OMITTED.get(ours.full_name, set())
    for field in ours.fields:
        assert _facts(field) == _facts(theirs.fields_by_name[field.name]), field.full_name


@pytest.mark.parametrize("ours", _enums(OUR_MESSAGES), ids=lambda e: e.full_name)
def test_enum_matches_theirs(ours: EnumDescriptor) -> None:
    theirs = THEIRS.FindEnumTypeByName(ours.full_name)
    assert [(v.name, v.number) for v in ours.values] == [
        (v.name, v.number) for v in theirs.values]


@pytest.mark.parametrize("service", ["PredictionService", "ModelService"])
def test_service_matches_theirs(service: str) -> None:
    ours = tf_serving_apis_pb2.DESCRIPTOR.services_by_name[service]
    theirs = THEIRS.FindServiceByName(ours.full_name)

    def methods(s: Any) -> list[tuple[Any, ...]]:
        return [(m.name, m.input_type.full_name, m.output_type.full_name,
                 m.client_streaming, m.server_streaming) for m in s.methods]
    assert methods(ours) == methods(theirs)


def test_our_messages_live_in_our_pool_only() -> None:
    """TensorFlow's files own these names in the default pool; ours stay in tf_pool."""
    ours = tf_serving_apis_pb2.PredictRequest.DESCRIPTOR
    assert POOL.FindMessageTypeByName(ours.full_name) is ours
    assert THEIRS.FindMessageTypeByName(ours.full_name) is predict_pb2.PredictRequest.DESCRIPTOR


def _theirs(ours: Message) -> Message:
    """Our message's bytes, read by TensorFlow's class of the same name."""
    cls = message_factory.GetMessageClass(THEIRS.FindMessageTypeByName(
        ours.DESCRIPTOR.full_name))
    return cls.FromString(ours.SerializeToString())


SAMPLES = {
    **SERVED,
    "string": np.array([b"a", "\u00e9".encode(), b"\xff\x00"], object),
    # Not served by Tapserve, but TensorProto carries them: the bytes must survive.
    "complex64": np.array([1 + 2j, -3j], np.complex64),
    "complex128": np.array([1e300 + 1j], np.complex128),
}


def test_predict_request_of_every_dtype_round_trips() -> None:
    """TF's PredictRequest (every dtype, both encodings, fields we leave out) through our
    class and back is unchanged, and our reader gets TF's arrays from it."""
    theirs = predict_pb2.PredictRequest(output_filter=["a", "b"])
    theirs.model_spec.name = "m"
    theirs.model_spec.version.value = 7
    theirs.model_spec.signature_name = "encoder"
    theirs.client_id = b"client"  # left out of ours: kept as an unknown field
    theirs.request_options.max_cache_length = 3
    for dtype, array in SAMPLES.items():
        theirs.inputs[dtype].CopyFrom(tf.make_tensor_proto(array))
        typed = tf.make_tensor_proto(array.ravel()[0])  # a scalar: a typed *_val field
        assert not typed.tensor_content, dtype
        theirs.inputs[f"{dtype}_typed"].CopyFrom(typed)
    ours = tf_serving_apis_pb2.PredictRequest.FromString(theirs.SerializeToString())
    assert predict_pb2.PredictRequest.FromString(ours.SerializeToString()) == theirs
    assert ours.model_spec.version.value == 7 and list(ours.output_filter) == ["a", "b"]
    for dtype, array in SAMPLES.items():
        if not dtype.startswith("complex"):
            np.testing.assert_array_equal(to_numpy(dtype, ours.inputs[dtype]), array)
            np.testing.assert_array_equal(to_numpy(dtype, ours.inputs[f"{dtype}_typed"]),
                                          array.ravel()[0])


@pytest.mark.parametrize("dtype", [d for d in SAMPLES if not d.startswith("complex")])
def test_our_tensors_read_back_with_make_ndarray(dtype: str) -> None:
    response = tf_serving_apis_pb2.PredictResponse(
        model_spec=tf_serving_apis_pb2.ModelSpec(name="m", version={"value": 2}),
        outputs={"y": from_numpy(SAMPLES[dtype])})
    theirs = _theirs(response)
    assert isinstance(theirs, predict_pb2.PredictResponse)
    back = tf.make_ndarray(theirs.outputs["y"])
    np.testing.assert_array_equal(back, SAMPLES[dtype])
    assert theirs.model_spec.version.value == 2


def test_model_metadata_response_with_a_packed_signature_map_round_trips() -> None:
    meta = EndpointMetadata(
        model="ae", endpoint="encoder", versions=(1,), platform="keras",
        inputs=(TensorSpec("image", "float32", (None, 8, 8, 1)),),
        outputs=(TensorSpec("code", "float32", (None, 4)), TensorSpec("label", "string", ())))
    signatures = tf_serving_apis_pb2.SignatureDefMap(signature_def={
        "encoder": signature_def(meta), "serving_default": signature_def(meta)})
    signatures.signature_def["encoder"].defaults["k"].CopyFrom(from_numpy(np.int32(3)))
    ours = tf_serving_apis_pb2.GetModelMetadataResponse(
        model_spec=tf_serving_apis_pb2.ModelSpec(name="ae", version={"value": 1}))
    ours.metadata["signature_def"].Pack(signatures)
    assert (ours.metadata["signature_def"].type_url
            == "type.googleapis.com/tensorflow.serving.SignatureDefMap")

    theirs = get_model_metadata_pb2.GetModelMetadataResponse.FromString(
        ours.SerializeToString())
    unpacked = get_model_metadata_pb2.SignatureDefMap()
    assert theirs.metadata["signature_def"].Unpack(unpacked)
    encoder = unpacked.signature_def["encoder"]
    assert encoder.method_name == "tensorflow/serving/predict"
    assert encoder.inputs["image"].name == "image"
    assert encoder.inputs["image"].dtype == tf.float32.as_datatype_enum
    assert [d.size for d in encoder.inputs["image"].tensor_shape.dim] == [-1, 8, 8, 1]
    assert encoder.outputs["label"].dtype == tf.string.as_datatype_enum
    assert tf.make_ndarray(encoder.defaults["k"]) == 3
    assert unpacked.SerializeToString(deterministic=True) == signatures.SerializeToString(
        deterministic=True)

    back = tf_serving_apis_pb2.GetModelMetadataResponse.FromString(theirs.SerializeToString())
    again = tf_serving_apis_pb2.SignatureDefMap()
    assert back.metadata["signature_def"].Unpack(again)
    assert again == signatures and back == ours


def test_model_status_response_round_trips() -> None:
    ours = tf_serving_apis_pb2.GetModelStatusResponse(model_version_status=[
        tf_serving_apis_pb2.ModelVersionStatus(
            version=3, state=tf_serving_apis_pb2.ModelVersionStatus.AVAILABLE,
            status=tf_serving_apis_pb2.StatusProto(error_code=tf_error_codes_pb2.OK)),
        tf_serving_apis_pb2.ModelVersionStatus(
            version=2, state=tf_serving_apis_pb2.ModelVersionStatus.END,
            status=tf_serving_apis_pb2.StatusProto(error_code=tf_error_codes_pb2.UNKNOWN,
                                                   error_message="it failed"))])
    theirs = get_model_status_pb2.GetModelStatusResponse.FromString(ours.SerializeToString())
    end = theirs.model_version_status[1]
    assert end.version == 2 and end.state == get_model_status_pb2.ModelVersionStatus.END
    assert end.status.error_code == 2 and end.status.error_message == "it failed"
    assert theirs.model_version_status[0].state == (
        get_model_status_pb2.ModelVersionStatus.AVAILABLE)
    assert tf_serving_apis_pb2.GetModelStatusResponse.FromString(
        theirs.SerializeToString()) == ours


def test_stock_stubs_talk_to_our_servicers(serve: Callable[..., Any]) -> None:
    """tensorflow-serving-api's stubs against our servicers: Predict, metadata and status
    answer; the methods Tapserve does not serve answer UNIMPLEMENTED, saying so, whatever
    fields their (field-less, in ours) requests carry."""
    plane = EchoDataPlane()

    def register(server: grpc.aio.Server) -> None:
        tf_serving_apis_pb2_grpc.add_PredictionServiceServicer_to_server(
            PredictionServicer(plane), server)
        tf_serving_apis_pb2_grpc.add_ModelServiceServicer_to_server(
            ModelStatusServicer(plane), server)

    with serve(register) as port, grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        predict = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        request = predict_pb2.PredictRequest(client_id=b"kept, not read")
        request.model_spec.name = "echo"
        request.inputs["x"].CopyFrom(tf.make_tensor_proto(SAMPLES["float32"]))
        answer = predict.Predict(request, timeout=30)
        np.testing.assert_array_equal(tf.make_ndarray(answer.outputs["x"]), SAMPLES["float32"])
        assert answer.model_spec.signature_name == "serving_default"

        meta = predict.GetModelMetadata(get_model_metadata_pb2.GetModelMetadataRequest(
            model_spec={"name": "echo"}, metadata_field=["signature_def"]), timeout=30)
        signatures = get_model_metadata_pb2.SignatureDefMap()
        assert meta.metadata["signature_def"].Unpack(signatures)
        assert signatures.signature_def["serving_default"].inputs["x"].dtype == tf.float32

        status = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(
            get_model_status_pb2.GetModelStatusRequest(model_spec={"name": "echo"}),
            timeout=30)
        assert status.model_version_status[0].state == (
            get_model_status_pb2.ModelVersionStatus.AVAILABLE)

        model = {"model_spec": {"name": "echo"}}
        unserved = [
            (predict.Classify, classification_pb2.ClassificationRequest(**model)),
            (predict.Regress, regression_pb2.RegressionRequest(**model)),
            (predict.MultiInference, inference_pb2.MultiInferenceRequest(
                tasks=[inference_pb2.InferenceTask(**model, method_name="x")])),
            (model_service_pb2_grpc.ModelServiceStub(channel).HandleReloadConfigRequest,
             model_management_pb2.ReloadConfigRequest(metric_names=["m"]))]
        for method, message in unserved:
            with pytest.raises(grpc.RpcError) as error:
                method(message, timeout=30)
            assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED
            assert "is not served: Tapserve" in error.value.details()
