"""End to end: every row of SPEC's error table, through the stock tritonclient against a
`tapserve serve` process. Each refusal has its gRPC status and a message that names what
was wrong and what exists, and the server serves the next good request unharmed."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import tritonclient.grpc as triton
import zoo
from backends import frontend_only
from scrape import wait_for
from stock import ServerProcess, infer
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

# One request waits in the queue for its batch to fill for 1.5 s: long enough to race.
# The queue holds 3 rows, assert_serves' request.
SLOW_BATCHING = {"max_queue_size": 3, "max_queue_delay_ms": 1500, "max_batch_size": 64,
                 "eager": False}


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("models")
    zoo.write_model("autoencoder", repo)  # batching.max_batch_size 8
    zoo.write_model("siamese", repo)  # two inputs: one can go missing
    zoo.write_model("multi_dtype", repo, folder="tokens",  # int64 tokens into an Embedding
                    config={"batching": {"max_batch_size": 9, "max_queue_delay_ms": 60_000,
                                         "eager": False}})
    # Same weights as the autoencoder, slow queues; one model per test that reads its
    # metrics, so their counts do not mix.
    for name in ("queued", "delayed", "draining"):
        zoo.write_model("autoencoder", repo, folder=name, config={"batching": SLOW_BATCHING})
    return repo


@pytest.fixture(scope="module")
def server(start_process, repository: Path) -> ServerProcess:
    return start_process(repository)


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> triton.InferenceServerClient:
    return server.client()


def images(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((rows, 8, 8, 1), dtype=np.float32)


def assert_serves(client: triton.InferenceServerClient, autoencoder: keras.Model,
                  model: str = "autoencoder") -> None:
    """A good request right after a bad one gets the right numbers."""
    x = images(3, seed=7)
    got = infer(client, model, {"image": x}).as_numpy("recon")
    np.testing.assert_allclose(got, np.asarray(autoencoder(x)), atol=1e-5)


def send(client: triton.InferenceServerClient, model: str, feeds: dict[str, np.ndarray],
         outputs: list[str] | None = None, cut_bytes: int = 0,
         **kwargs: object) -> triton.InferResult:
    """Like stock.infer, but may drop `cut_bytes` from the end of each input's raw bytes."""
    if not cut_bytes:
        return infer(client, model, feeds, outputs, **kwargs)
    inputs = []
    for name, array in feeds.items():
        tensor = triton.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        tensor._raw_content = tensor._raw_content[:-cut_bytes]  # what a buggy client sends
        inputs.append(tensor)
    return client.infer(model, inputs, **kwargs)


X = images(2)
CASES = {
    # id: (model, feeds, send() keywords, status, what the message must say)
    "unknown model": ("nope", {"image": X}, {}, "NOT_FOUND",
                      ["no model 'nope'", "autoencoder", "siamese"]),
    "unknown endpoint": ("autoencoder.nope", {"image": X}, {}, "NOT_FOUND",
                         ["no endpoint 'nope'", "autoencoder, encoder, decoder"]),
    "unknown version": ("autoencoder", {"image": X}, {"model_version": "7"}, "NOT_FOUND",
                        ["serves version 1", "not 7"]),
    "unknown output": ("autoencoder", {"image": X}, {"outputs": ["nope"]}, "NOT_FOUND",
                       ["no output 'nope'", "autoencoder.autoencoder"]),
    "tap not computable from the endpoint's inputs": (
        "autoencoder.decoder", {"code": np.zeros((2, 4), np.float32)},
        {"outputs": ["enc_conv"]}, "NOT_FOUND", ["no output 'enc_conv'", "['code']"]),
    "wrong input name": ("autoencoder", {"img": X}, {}, "INVALID_ARGUMENT",
                         ["takes inputs image (float32 [-1,8,8,1])", "missing ['image']",
                          "unexpected ['img']"]),
    "wrong dtype": ("autoencoder", {"image": X.astype(np.float64)}, {}, "INVALID_ARGUMENT",
                    ["input 'image' must be float32, got float64"]),
    "wrong rank": ("autoencoder", {"image": X[..., 0]}, {}, "INVALID_ARGUMENT",
                   ["input 'image' has shape [2, 8, 8]", "[-1,8,8,1]"]),
    "wrong fixed dim": ("autoencoder", {"image": X[:, :, :7]}, {}, "INVALID_ARGUMENT",
                        ["input 'image' has shape [2, 8, 7, 1]", "[-1,8,8,1]"]),
    "missing input": ("siamese", {"left": np.zeros((2, 12), np.float32)}, {},
                      "INVALID_ARGUMENT", ["missing ['right']", "left (float32 [-1,12])"]),
    "byte count not the shape's": ("autoencoder", {"image": X}, {"cut_bytes": 4},
                                   "INVALID_ARGUMENT",
                                   ["input 'image'", "needs 512 bytes, got 508"]),
}


@pytest.mark.parametrize("case", CASES)
def test_refused_with_a_status_and_a_reason_then_serves(client, autoencoder, case: str) -> None:
    model, feeds, kwargs, status, says = CASES[case]
    with pytest.raises(InferenceServerException) as err:
        send(client, model, feeds, **kwargs)
    assert err.value.status() == f"StatusCode.{status}", err.value
    for words in says:
        assert words in err.value.message(), err.value.message()
    assert_serves(client, autoencoder)


def test_a_batch_over_max_batch_size_is_split_not_refused(server, client, autoencoder) -> None:
    x = images(21, seed=3)  # autoencoder's max_batch_size is 8: pieces of 8, 8, 5
    whole = infer(client, "autoencoder", {"image": x}).as_numpy("recon")
    pieces = np.concatenate([infer(client, "autoencoder", {"image": x[i:i + 3]})
                             .as_numpy("recon") for i in range(0, len(x), 3)])
    assert whole.shape == (21, 8, 8, 1)
    np.testing.assert_allclose(whole, pieces, atol=1e-6)
    np.testing.assert_allclose(whole, np.asarray(autoencoder(x)), atol=1e-5)
    # No batch the model computed was larger than 8 rows.
    batches = server.metric("tapserve_batch_size_count", model="autoencoder")
    assert batches and server.metric("tapserve_batch_size_bucket", model="autoencoder",
                                     le="8.0") == batches


@frontend_only
def test_queue_full_is_resource_exhausted(server, client, autoencoder) -> None:
    waiting: dict[str, object] = {}
    x = images(3, seed=5)  # fills the 3-row queue

    def first() -> None:
        with server.client() as c:
            waiting["recon"] = infer(c, "queued", {"image": x}).as_numpy("recon")

    thread = threading.Thread(target=first)
    thread.start()
    try:
        wait_for(lambda: server.metric("tapserve_queue_depth", model="queued") == 3,
                 "the first request to queue")
        with pytest.raises(InferenceServerException) as err:
            infer(client, "queued", {"image": x[:1]})
    finally:
        thread.join(30)
    assert err.value.status() == "StatusCode.RESOURCE_EXHAUSTED", err.value
    assert "the queue is full (3 rows waiting, limit 3" in err.value.message()
    np.testing.assert_allclose(waiting["recon"], np.asarray(autoencoder(x)), atol=1e-5)
    assert_serves(client, autoencoder, "queued")


@frontend_only
def test_deadline_passed_in_the_queue_is_not_computed(server, client, autoencoder) -> None:
    started = time.monotonic()
    with pytest.raises(InferenceServerException) as err:
        infer(client, "delayed", {"image": images(1)}, client_timeout=0.3)
    assert time.monotonic() - started < 1.4  # answered before its batch could close
    assert err.value.status() == "StatusCode.DEADLINE_EXCEEDED", err.value
    assert "Deadline" in err.value.message()
    # The request sat in the queue; once its batch closed (the delay passed) it left it...
    wait_for(lambda: server.metric("tapserve_queue_depth", model="delayed") == 0,
             "the expired request's batch to close")
    assert not server.metric("tapserve_batch_size_count", model="delayed")
    # ...and a good request after it is the only batch the model ever computed.
    assert_serves(client, autoencoder, "delayed")
    assert server.metric("tapserve_batch_size_count", model="delayed") == 1
    assert server.metric("tapserve_batch_size_sum", model="delayed") == 3


@frontend_only
def test_draining_refuses_new_requests_and_finishes_accepted_ones(
        start_process, repository: Path, autoencoder) -> None:
    process = start_process(repository, "--drain-grace-seconds", "20")
    x = images(2, seed=11)
    accepted: dict[str, object] = {}

    def in_flight() -> None:
        with process.client() as c:
            try:
                accepted["recon"] = infer(c, "draining", {"image": x}).as_numpy("recon")
            except InferenceServerException as exc:
                accepted["error"] = exc

    thread = threading.Thread(target=in_flight)
    thread.start()
    wait_for(lambda: process.metric("tapserve_queue_depth", model="draining") == 2,
             "the request to be accepted and queued")
    with process.client() as c:
        process.process.terminate()  # SIGTERM
        wait_for(lambda: "draining (grace 20.0s)" in process.output(), "the drain to start")
        with pytest.raises(InferenceServerException) as err:
            infer(c, "autoencoder", {"image": x})
        assert not c.is_server_ready()
        assert thread.is_alive()  # the accepted request still holds the drain open
    assert err.value.status() == "StatusCode.UNAVAILABLE", err.value
    assert "the server is shutting down; retry on another replica" in err.value.message()
    thread.join(30)
    assert "error" not in accepted, accepted
    np.testing.assert_allclose(accepted["recon"], np.asarray(autoencoder(x)), atol=1e-5)
    assert process.process.wait(30) == 0  # it exits by itself once drained
    assert "stopped" in process.output()


def test_a_request_the_model_cannot_compute_fails_alone(server, repository: Path) -> None:
    # Regression: one request with a token outside the Embedding's vocabulary once failed
    # every request batched with it. Three 3-row requests fill one 9-row batch.
    model = keras.models.load_model(repository / "tokens" / "1" / "model.keras")
    feeds = [zoo.sample_inputs(model, batch=3, seed=i) for i in range(3)]
    feeds[1]["tokens"][1, 2] = zoo.TOKEN_VOCAB_SIZE + 10
    results: dict[int, object] = {}

    def call(i: int) -> None:
        with server.client() as c:
            try:
                results[i] = infer(c, "tokens", feeds[i]).as_numpy("cls")
            except InferenceServerException as exc:
                results[i] = exc

    threads = [threading.Thread(target=call, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    bad = results[1]
    assert isinstance(bad, InferenceServerException), bad
    assert bad.status() == "StatusCode.INVALID_ARGUMENT"
    assert "cannot compute this input" in bad.message() and "60" in bad.message()
    for i in (0, 2):
        want = np.asarray(model([feeds[i]["tokens"], feeds[i]["features"]])[0])
        np.testing.assert_allclose(results[i], want, atol=1e-5)
    assert server.metric("tapserve_batch_size_count", model="tokens") >= 1
