"""End to end: ModelStreamInfer through the stock tritonclient (start_stream /
async_stream_infer, and the asyncio client's stream_infer) against `tapserve serve`.

Answers equal the unary call's, each under its request's id; a bad request gets its own
error (the unary call's message) and the stream goes on; one stream's requests batch
together; the in-flight bound holds; tokens, metrics, cancellation and the drain apply."""

from __future__ import annotations

import asyncio
import contextlib
import queue
import time
from pathlib import Path

import grpc
import keras
import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
import zoo
from backends import frontend_only
from scrape import wait_for
from stock import ServerProcess, infer, infer_inputs, requested
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

TOKEN = "tok-stream-5d1e"
SHUTTING_DOWN = "the server is shutting down; retry on another replica"
# Requests wait this long in the queue for their batch to fill: long enough to look at.
SLOW = {"max_batch_size": 64, "max_queue_delay_ms": 1500, "max_queue_size": 64, "eager": False}


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("models")
    zoo.write_model("autoencoder", repo)  # endpoints autoencoder, encoder, decoder
    zoo.write_model("two_heads", repo)
    # Same weights as the autoencoder; one model per test that reads its metrics.
    for name, batching in (("batched", {"max_batch_size": 64, "max_queue_delay_ms": 20}),
                           ("counted", {}), ("slow", SLOW), ("cancelled", SLOW)):
        zoo.write_model("autoencoder", repo, folder=name, config={"batching": batching})
    return repo


@pytest.fixture(scope="module")
def server(start_process, repository: Path) -> ServerProcess:
    return start_process(repository)


def images(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((rows, 8, 8, 1), dtype=np.float32)


class Answers:
    """A start_stream callback: every (result, error) the stream delivers, in order."""

    def __init__(self) -> None:
        self.queue: queue.Queue = queue.Queue()

    def __call__(self, result: triton.InferResult | None,
                 error: InferenceServerException | None) -> None:
        self.queue.put((result, error))

    def take(self, count: int, timeout: float = 60) -> list[tuple]:
        return [self.queue.get(timeout=timeout) for _ in range(count)]

    def results_by_id(self, count: int) -> tuple[dict[str, triton.InferResult], list]:
        """(successful results by request id, errors), of the next `count` answers."""
        results, errors = {}, []
        for result, error in self.take(count):
            if error is None:
                results[result.get_response().id] = result
            else:
                errors.append(error)
        return results, errors


def send(client: triton.InferenceServerClient, model: str, feeds: dict[str, np.ndarray],
         request_id: str, outputs: list[str] | None = None) -> None:
    client.async_stream_infer(model, infer_inputs(feeds), request_id=request_id,
                              outputs=requested(outputs))


# (model, feeds, requested outputs) for several endpoints and taps of two models.
def cases(repository: Path) -> dict[str, tuple[str, dict[str, np.ndarray], list[str] | None]]:
    two_heads = keras.models.load_model(repository / "two_heads" / "1" / "model.keras")
    x = images(3, seed=1)
    code = np.random.default_rng(2).normal(size=(2, 4)).astype(np.float32)
    return {
        "ae": ("autoencoder", {"image": x}, None),
        "enc": ("autoencoder.encoder", {"image": x[:1]}, None),
        "dec": ("autoencoder.decoder", {"code": code}, None),
        "taps": ("autoencoder", {"image": x}, ["enc_conv", "code", "recon"]),
        "heads": ("two_heads", zoo.sample_inputs(two_heads, batch=4), ["a_hidden", "label"]),
    }


def test_answers_equal_the_unary_call_under_their_ids(server, repository: Path) -> None:
    requests = cases(repository)
    answers = Answers()
    with server.client() as client:
        client.start_stream(answers)
        try:
            for request_id, (model, feeds, outputs) in requests.items():
                send(client, model, feeds, request_id, outputs)
            results, errors = answers.results_by_id(len(requests))
        finally:
            client.stop_stream()
        assert not errors, [e.message() for e in errors]
        assert sorted(results) == sorted(requests)
        for request_id, (model, feeds, outputs) in requests.items():
            unary = infer(client, model, feeds, outputs)
            streamed = results[request_id].get_response(as_json=True)
            assert streamed["model_name"] == model and streamed["model_version"] == "1"
            names = [o["name"] for o in unary.get_response(as_json=True)["outputs"]]
            assert [o["name"] for o in streamed["outputs"]] == names, request_id
            for name in names:
                np.testing.assert_allclose(results[request_id].as_numpy(name),
                                           unary.as_numpy(name), atol=1e-6)


def bad_requests() -> dict[str, tuple[str, dict[str, np.ndarray], list[str] | None]]:
    return {
        "unknown-model": ("no_such_model", {"image": images(1)}, None),
        "bad-shape": ("autoencoder", {"image": images(1)[:, :7]}, None),
        "wrong-dtype": ("autoencoder", {"image": images(1).astype(np.float64)}, None),
        "unknown-tap": ("autoencoder", {"image": images(1)}, ["no_such_tap"]),
    }


@frontend_only
def test_a_bad_request_gets_its_error_and_the_stream_goes_on(server, autoencoder) -> None:
    answers = Answers()
    x = images(2, seed=5)
    with server.client() as client:
        unary_errors = []
        for model, feeds, outputs in bad_requests().values():
            with pytest.raises(InferenceServerException) as err:
                infer(client, model, feeds, outputs)
            unary_errors.append(err.value.message())
        client.start_stream(answers)
        try:
            send(client, "autoencoder", {"image": x}, "before")
            assert answers.take(1)[0][1] is None  # answered before the bad ones are sent
            for request_id, (model, feeds, outputs) in bad_requests().items():
                send(client, model, feeds, request_id, outputs)
            errors = [error for _, error in answers.take(len(bad_requests()))]
            # The same stream still serves.
            send(client, "autoencoder", {"image": x}, "after")
            (result, error), = answers.take(1)
        finally:
            client.stop_stream()
    assert all(e is not None for e in errors), errors
    assert sorted(e.message() for e in errors) == sorted(unary_errors)
    assert error is None, error
    assert result.get_response().id == "after"
    np.testing.assert_allclose(result.as_numpy("recon"), np.asarray(autoencoder(x)), atol=1e-5)


@frontend_only
def test_an_error_answer_carries_the_request_id_and_model(server) -> None:
    # Below tritonclient's callback (which passes on the message only): the raw stream.
    def request(request_id: str, model: str, shape: list[int]) -> service_pb2.ModelInferRequest:
        msg = service_pb2.ModelInferRequest(model_name=model, id=request_id)
        msg.inputs.add(name="image", datatype="FP32", shape=shape)
        msg.raw_input_contents.append(np.zeros(shape, np.float32).tobytes())
        return msg

    sent = [request("ok-1", "autoencoder", [1, 8, 8, 1]),
            request("bad-1", "autoencoder", [1, 8, 7, 1]),
            request("bad-2", "no_such_model", [1, 8, 8, 1]),
            request("ok-2", "autoencoder.encoder", [2, 8, 8, 1])]
    with grpc.insecure_channel(server.url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        answers = {a.infer_response.id: a for a in stub.ModelStreamInfer(iter(sent), timeout=60)}
        unary = {}
        for bad in sent[1:3]:
            with pytest.raises(grpc.RpcError) as err:
                stub.ModelInfer(bad, timeout=60)
            unary[bad.id] = err.value.details()
    assert sorted(answers) == ["bad-1", "bad-2", "ok-1", "ok-2"]
    for request_id, model in (("bad-1", "autoencoder"), ("bad-2", "no_such_model")):
        assert answers[request_id].error_message == unary[request_id]
        assert answers[request_id].infer_response.model_name == model
        assert not answers[request_id].infer_response.outputs
    assert not answers["ok-2"].error_message
    assert answers["ok-2"].infer_response.model_name == "autoencoder.encoder"
    assert list(answers["ok-2"].infer_response.outputs[0].shape) == [2, 4]


def test_many_requests_in_flight_on_one_stream_batch_together(server, autoencoder) -> None:
    count = 200
    feeds = [images(1, seed=i) for i in range(count)]
    answers = Answers()
    with server.client() as client:
        client.start_stream(answers)
        try:
            for i, x in enumerate(feeds):
                send(client, "batched", {"image": x}, f"r{i}")
            results, errors = answers.results_by_id(count)
        finally:
            client.stop_stream()
    assert not errors, [e.message() for e in errors[:3]]
    assert sorted(results) == sorted(f"r{i}" for i in range(count))
    want = np.asarray(autoencoder(np.concatenate(feeds)))
    for i in range(count):
        np.testing.assert_allclose(results[f"r{i}"].as_numpy("recon"), want[i:i + 1],
                                   atol=1e-5)
    # Handled one at a time, each request would have been a batch of its own.
    batches = server.metric("tapserve_batch_size_count", model="batched")
    assert server.metric("tapserve_batch_size_sum", model="batched") == count
    assert batches < count / 2, f"{batches} batches for {count} streamed 1-row requests"


@frontend_only
def test_every_streamed_request_is_counted_with_its_code(server) -> None:
    answers = Answers()
    with server.client() as client:
        client.start_stream(answers)
        try:
            for i in range(3):
                send(client, "counted", {"image": images(1)}, f"ok{i}")
            send(client, "counted", {"image": images(1)[:, :7]}, "bad")
            send(client, "counted.no_such_endpoint", {"image": images(1)}, "missing")
            answers.take(5)
        finally:
            client.stop_stream()

    def count(code: str) -> float | None:
        return server.metric("tapserve_requests_total", model="counted", code=code,
                             protocol="kserve_grpc")

    assert count("OK") == 3
    assert count("INVALID_ARGUMENT") == 1
    assert server.metric("tapserve_requests_total", model="counted", endpoint="_unknown",
                         code="NOT_FOUND", protocol="kserve_grpc") == 1


@frontend_only
def test_the_asyncio_client_streams_too(server, autoencoder) -> None:
    x = images(4, seed=9)

    async def main() -> list[tuple]:
        async def requests():
            for i in range(4):
                yield {"model_name": "autoencoder", "inputs": infer_inputs({"image": x[i:i + 1]}),
                       "request_id": f"a{i}"}
            yield {"model_name": "no_such_model", "inputs": infer_inputs({"image": x}),
                   "request_id": "bad"}

        async with triton_aio.InferenceServerClient(server.url) as client:
            answers = []
            async for answer in client.stream_infer(requests()):
                answers.append(answer)
                if len(answers) == 5:
                    break
            return answers

    answers = asyncio.run(main())
    errors = [e for _, e in answers if e is not None]
    assert len(errors) == 1 and "no_such_model" in errors[0].message()
    want = np.asarray(autoencoder(x))
    for result, error in answers:
        if error is None:
            i = int(result.get_response().id[1:])
            np.testing.assert_allclose(result.as_numpy("recon"), want[i:i + 1], atol=1e-5)


@frontend_only
def test_a_cancelled_stream_drops_its_pending_requests(server, autoencoder) -> None:
    answers = Answers()
    with server.client() as client:
        client.start_stream(answers)
        for i in range(3):
            send(client, "cancelled", {"image": images(1, seed=i)}, f"c{i}")
        wait_for(lambda: server.metric("tapserve_queue_depth", model="cancelled") == 3,
                 "the streamed requests to queue")
        client.stop_stream(cancel_requests=True)
        wait_for(lambda: server.metric("tapserve_requests_total", model="cancelled",
                                       code="CANCELLED") == 3, "the requests to be cancelled")
        # Dropped from the queue before their batch ran: never computed.
        wait_for(lambda: server.metric("tapserve_queue_depth", model="cancelled") == 0,
                 "the queue to empty")
        x = images(2, seed=4)
        got = infer(client, "cancelled", {"image": x}).as_numpy("recon")
    np.testing.assert_allclose(got, np.asarray(autoencoder(x)), atol=1e-5)
    assert server.metric("tapserve_batch_size_sum", model="cancelled") == 2


@pytest.fixture(scope="module")
def guarded(start_process, repository: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> ServerProcess:
    """Tokens required, and at most 4 requests in flight per stream."""
    tokens = tmp_path_factory.mktemp("tokens") / "tokens"
    tokens.write_text(f"{TOKEN}\n")
    return start_process(repository, "--auth-token-file", str(tokens),
                         "--max-stream-in-flight", "4")


@frontend_only
def test_a_stream_needs_a_token(guarded: ServerProcess, autoencoder) -> None:
    x = images(1)
    for headers in ({}, {"authorization": "Bearer tok-wrong"}):
        answers = Answers()
        with guarded.client() as client:
            client.start_stream(answers, headers=headers)
            try:
                # The refusal may end the stream before this is sent: then tritonclient
                # refuses to send it and points at the callback.
                with contextlib.suppress(InferenceServerException):
                    send(client, "autoencoder", {"image": x}, "refused")
                (result, error), = answers.take(1)
            finally:
                client.stop_stream()
        assert result is None and error.status() == "StatusCode.UNAUTHENTICATED", error
        assert "bearer token" in error.message()
    answers = Answers()
    with guarded.client() as client:
        client.start_stream(answers, headers={"authorization": f"Bearer {TOKEN}"})
        try:
            send(client, "autoencoder", {"image": x}, "allowed")
            (result, error), = answers.take(1)
        finally:
            client.stop_stream()
    assert error is None, error
    np.testing.assert_allclose(result.as_numpy("recon"), np.asarray(autoencoder(x)), atol=1e-5)


@frontend_only
def test_a_stream_holds_at_most_its_bound_in_flight(guarded: ServerProcess) -> None:
    answers = Answers()
    depth = []
    with guarded.client() as client:
        client.start_stream(answers, headers={"authorization": f"Bearer {TOKEN}"})
        try:
            for i in range(10):
                send(client, "slow", {"image": images(1, seed=i)}, f"s{i}")
            wait_for(lambda: guarded.metric("tapserve_queue_depth", model="slow") == 4,
                     "the first 4 requests to queue")
            time.sleep(0.5)  # the other 6 were sent: they must still wait in the stream
            depth.append(guarded.metric("tapserve_queue_depth", model="slow"))
            results, errors = answers.results_by_id(10)
        finally:
            client.stop_stream()
    assert depth == [4], f"{depth[0]} requests of one stream queued; the bound is 4"
    assert not errors and len(results) == 10


@frontend_only
def test_a_draining_server_answers_what_it_read_then_ends_the_stream(
        start_process, repository: Path, autoencoder) -> None:
    process = start_process(repository, "--drain-grace-seconds", "20")
    answers = Answers()
    x = images(2, seed=12)
    with process.client() as client:
        client.start_stream(answers)
        try:
            send(client, "slow", {"image": x[:1]}, "d0")
            send(client, "slow", {"image": x[1:]}, "d1")
            wait_for(lambda: process.metric("tapserve_queue_depth", model="slow") == 2,
                     "the streamed requests to queue")
            process.process.terminate()  # SIGTERM
            got = answers.take(3)
        finally:
            client.stop_stream()
    results = {r.get_response().id: r for r, e in got[:2] if e is None}
    assert sorted(results) == ["d0", "d1"], got
    want = np.asarray(autoencoder(x))
    for i in range(2):
        np.testing.assert_allclose(results[f"d{i}"].as_numpy("recon"), want[i:i + 1],
                                   atol=1e-5)
    _, end = got[2]  # then the stream ends, saying why
    assert end.status() == "StatusCode.UNAVAILABLE" and SHUTTING_DOWN in end.message(), end
    assert process.process.wait(30) == 0
