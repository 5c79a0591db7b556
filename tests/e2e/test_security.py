"""End to end: TLS, mutual TLS and bearer tokens on a real `tapserve serve`, through the
stock clients (tritonclient.grpc and .http with `ssl=True`, TF Serving's gRPC stub, plain
urllib for TF Serving REST), with certificates made here by trustme. Also: certificate and
token files changed on disk are picked up without a restart, and health stays open."""

from __future__ import annotations

import json
import os
import re
import socket
import ssl
import subprocess
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import gevent.ssl
import grpc
import keras
import numpy as np
import pytest
import scrape
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import trustme
import zoo
from backends import HAS_TFS_CLIENT, frontend_only, needs_tfs_client
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc
from ports import free_port
from stock import TAPSERVE, ServerProcess, infer
from tritonclient.utils import InferenceServerException

if HAS_TFS_CLIENT:  # the stock TF Serving client: tensorflow's protos and tensors
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

pytestmark = frontend_only  # the front doors only: the same on every backend
TOKEN = "tok-3f9a1c"  # the tokens the file starts with
OTHER_TOKEN = "tok-b77e20"
WRONG = "tok-wrong"
MODEL = "autoencoder"
IMAGES = np.random.default_rng(0).random((2, 8, 8, 1), dtype=np.float32)


def write_atomically(path: Path, data: bytes) -> None:
    """As a Secret volume updates: the new file appears whole, never half written."""
    staging = path.with_name(path.name + ".new")
    staging.write_bytes(data)
    os.replace(staging, path)


def write_leaf(cert: trustme.LeafCert, folder: Path, name: str) -> tuple[Path, Path]:
    chain, key = folder / f"{name}.pem", folder / f"{name}.key"
    write_atomically(key, cert.private_key_pem.bytes())
    write_atomically(chain, b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    return chain, key


def serial_of(cert: trustme.LeafCert) -> int:
    return x509.load_pem_x509_certificate(cert.cert_chain_pems[0].bytes()).serial_number


class Pki:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.ca = trustme.CA()
        self.ca_file = folder / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self.server_cert = self.ca.issue_cert("127.0.0.1", "localhost")
        self.cert_file, self.key_file = write_leaf(self.server_cert, folder, "server")
        self.client_cert_file, self.client_key_file = write_leaf(
            self.ca.issue_cert("client@example.com"), folder, "client")
        stranger = trustme.CA()  # a client certificate this server's CA never signed
        self.stranger_cert_file, self.stranger_key_file = write_leaf(
            stranger.issue_cert("stranger@example.com"), folder, "stranger")

    def client_context(self, client_cert: bool = False) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca_file))
        if client_cert:
            context.load_cert_chain(self.client_cert_file, self.client_key_file)
        return context


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("security_models")
    zoo.write_model(MODEL, repo)
    return repo


@pytest.fixture(scope="module")
def expected(repository: Path) -> np.ndarray:
    model = keras.models.load_model(repository / MODEL / "1" / "model.keras")
    return np.asarray(model(IMAGES))


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tokens") / "tokens"
    path.write_text(f"# clients of team A\n{TOKEN}\n\n   \n")
    return path


@pytest.fixture(scope="module")
def server(start_process, repository: Path, pki: Pki, token_file: Path) -> ServerProcess:
    """TLS (no client certificates), tokens, and the plaintext health port."""
    server = start_process(
        repository, "--http-port", str(free_port()), "--health-port", str(free_port()),
        "--tls-cert-file", str(pki.cert_file), "--tls-key-file", str(pki.key_file),
        "--auth-token-file", str(token_file),
        client_options={"ssl": True, "root_certificates": str(pki.ca_file)})
    server.http = logged_port(server, "HTTP on")
    server.health_port = int(logged_port(server, "(plaintext) on").split(":")[1])
    return server


def logged_port(server: ServerProcess, after: str) -> str:
    """The 127.0.0.1:port the start-up line names after `after`."""
    return re.search(re.escape(after) + r" (127\.0\.0\.1:\d+)", server.output())[1]


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def grpc_status(call: Any) -> str:
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value.status()


def rest(server: ServerProcess, pki: Pki, path: str, body: Any = None,
         token: str | None = None, client_cert: bool = False) -> tuple[int, Any, Any]:
    """TF Serving REST / KServe REST as urllib sends it over TLS: (status, JSON, headers)."""
    request = urllib.request.Request(
        f"https://{server.http}{path}", method="POST" if body is not None else "GET",
        data=None if body is None else json.dumps(body).encode(),
        headers=bearer(token) if token else {})
    try:
        with urllib.request.urlopen(request, timeout=30,
                                    context=pki.client_context(client_cert)) as response:
            return response.status, json.loads(response.read()), response.headers
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), exc.headers


def http_client(server: ServerProcess, pki: Pki,
                **ssl_options: str) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(
        server.http, ssl=True, ssl_options=ssl_options,
        ssl_context_factory=lambda **_: gevent.ssl.create_default_context(
            cafile=str(pki.ca_file)))


def http_infer(client: httpclient.InferenceServerClient, **kwargs: Any) -> np.ndarray:
    tensor = httpclient.InferInput("image", list(IMAGES.shape), "FP32")
    tensor.set_data_from_numpy(IMAGES)
    return client.infer(MODEL, [tensor], **kwargs).as_numpy("recon")


def served_serial(port: int, pki: Pki) -> int:
    """The serial number of the certificate a new TLS connection to `port` is shown."""
    context = pki.client_context()
    context.set_alpn_protocols(["h2", "http/1.1"])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True)).serial_number


def refused(server: ServerProcess, protocol: str, model: str = MODEL) -> float:
    return server.metric("tapserve_requests_total", model=model, code="UNAUTHENTICATED",
                         protocol=protocol) or 0.0


# ---- TLS and tokens through each front door ---------------------------------------------


def test_grpc_over_tls_needs_a_token_for_inference_and_metadata(
        server: ServerProcess, expected: np.ndarray) -> None:
    before = refused(server, "kserve_grpc")
    unknown_before = refused(server, "kserve_grpc", "_unknown")
    metadata_method = {"method": "/inference.GRPCInferenceService/ModelMetadata",
                       "code": "UNAUTHENTICATED"}
    metadata_before = server.metric("tapserve_grpc_requests_total", **metadata_method) or 0
    with server.client() as client:
        recon = infer(client, MODEL, {"image": IMAGES}, headers=bearer(TOKEN)).as_numpy("recon")
        np.testing.assert_allclose(recon, expected, rtol=1e-5, atol=1e-6)
        for headers in (None, bearer(WRONG), {"authorization": TOKEN}):  # no "Bearer"
            status = grpc_status(lambda h=headers: infer(client, MODEL, {"image": IMAGES},
                                                         headers=h))
            assert status == "StatusCode.UNAUTHENTICATED", headers
        assert grpc_status(lambda: infer(client, "no_such_model", {"image": IMAGES})) \
            == "StatusCode.UNAUTHENTICATED"
        for call in (client.get_server_metadata, lambda **kw: client.get_model_metadata(
                MODEL, **kw), lambda **kw: client.get_inference_statistics(MODEL, **kw),
                client.get_model_repository_index):
            assert grpc_status(call) == "StatusCode.UNAUTHENTICATED"
            assert grpc_status(lambda c=call: c(headers=bearer(WRONG))) \
                == "StatusCode.UNAUTHENTICATED"
            call(headers=bearer(TOKEN))
        # Health stays open: probes and load balancers carry no token.
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready(MODEL)
    # Each refused inference call is counted under its model (the unknown one under
    # _unknown), and every refused call under its method.
    assert refused(server, "kserve_grpc") == before + 3
    assert refused(server, "kserve_grpc", "_unknown") == unknown_before + 1
    assert server.metric("tapserve_grpc_requests_total", **metadata_method) \
        == metadata_before + 2
    assert server.metric("tapserve_requests_total", model=MODEL, code="OK",
                         protocol="kserve_grpc") >= 1


@needs_tfs_client
def test_tf_serving_grpc_over_tls_needs_a_token(server: ServerProcess, pki: Pki,
                                                expected: np.ndarray) -> None:
    before = refused(server, "tfserving_grpc")
    credentials = grpc.ssl_channel_credentials(pki.ca_file.read_bytes())
    with grpc.secure_channel(server.url, credentials) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        request = predict_pb2.PredictRequest()
        request.model_spec.name = MODEL
        request.inputs["image"].CopyFrom(tf.make_tensor_proto(IMAGES))
        answer = stub.Predict(request, metadata=tuple(bearer(TOKEN).items()), timeout=30)
        recon = np.frombuffer(answer.outputs["recon"].tensor_content, np.float32)
        np.testing.assert_allclose(recon.reshape(expected.shape), expected, rtol=1e-5,
                                   atol=1e-6)
        for metadata in ((), tuple(bearer(WRONG).items())):
            with pytest.raises(grpc.RpcError) as info:
                stub.Predict(request, metadata=metadata, timeout=30)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "bearer token" in info.value.details()
    assert refused(server, "tfserving_grpc") == before + 2


def test_http_over_tls_needs_a_token(server: ServerProcess, pki: Pki,
                                     expected: np.ndarray) -> None:
    before = refused(server, "kserve_http")
    with http_client(server, pki) as client:
        np.testing.assert_allclose(http_infer(client, headers=bearer(TOKEN)), expected,
                                   rtol=1e-5, atol=1e-6)
        for headers in (None, bearer(WRONG)):
            with pytest.raises(InferenceServerException) as info:
                http_infer(client, headers=headers)
            assert info.value.status() == "401", headers
            assert "bearer token" in info.value.message()
        with pytest.raises(InferenceServerException) as info:
            client.get_model_metadata(MODEL)
        assert info.value.status() == "401"
        assert client.get_model_metadata(MODEL, headers=bearer(TOKEN))["name"] == MODEL
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready(MODEL)
    assert refused(server, "kserve_http") == before + 2

    # TF Serving REST, as urllib sends it.
    before = refused(server, "tfserving_http")
    body = {"instances": IMAGES.tolist()}
    status, answer, _ = rest(server, pki, f"/v1/models/{MODEL}:predict", body, token=TOKEN)
    assert status == 200
    np.testing.assert_allclose(np.array(answer["predictions"], np.float32), expected,
                               rtol=1e-5, atol=1e-6)
    for token in (None, WRONG):
        status, answer, headers = rest(server, pki, f"/v1/models/{MODEL}:predict", body,
                                       token=token)
        assert status == 401 and "bearer token" in answer["error"], answer
        assert headers["WWW-Authenticate"].startswith("Bearer")
    assert refused(server, "tfserving_http") == before + 2
    for path in (f"/v1/models/{MODEL}", f"/v1/models/{MODEL}/metadata", "/v2",
                 "/v2/models/stats", "/no/such/route"):
        assert rest(server, pki, path)[0] == 401, path
    assert rest(server, pki, f"/v1/models/{MODEL}", token=TOKEN)[0] == 200
    # Health stays open; so does /metrics, which is plaintext on its own port.
    for path in ("/v2/health/live", "/v2/health/ready", f"/v2/models/{MODEL}/ready"):
        assert rest(server, pki, path)[0] == 200, path
    assert urllib.request.urlopen(server.metrics_url, timeout=10).status == 200
    # Tokens are compared, never written down.
    assert TOKEN not in server.output() and WRONG not in server.output()


def test_plaintext_to_the_tls_ports_fails_and_disturbs_nothing(
        server: ServerProcess, pki: Pki) -> None:
    with grpcclient.InferenceServerClient(server.url) as plain, \
            pytest.raises(InferenceServerException):
        plain.is_server_live(client_timeout=5)
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        urllib.request.urlopen(f"http://{server.http}/v2/health/live", timeout=5)
    # Regression: the client saw an empty reply and the server said nothing at all.
    scrape.wait_for(lambda: "plaintext HTTP request(s) reached the HTTP port, which serves TLS only"
             in server.output(), "the server to log the plaintext client")
    with server.client() as client:
        assert client.is_server_ready()
        infer(client, MODEL, {"image": IMAGES}, headers=bearer(TOKEN))
    assert rest(server, pki, "/v2/health/ready")[0] == 200


def test_health_answers_without_tls_or_token_on_the_health_port(server: ServerProcess) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{server.health_port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", MODEL):
            answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        # Nothing else is served there.
        with pytest.raises(grpc.RpcError) as info:
            channel.unary_unary("/inference.GRPCInferenceService/ServerMetadata")(
                b"", timeout=10)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    # On the TLS port, grpc.health.v1 needs no token either.
    with server.client() as client:
        channel = client._channel  # tritonclient's own TLS channel
        answer = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING


# ---- files changed on disk ---------------------------------------------------------------


def test_a_changed_token_file_takes_effect_without_a_restart(
        server: ServerProcess, token_file: Path) -> None:
    def accepted(token: str) -> bool:
        try:
            client.get_server_metadata(headers=bearer(token))
        except InferenceServerException as exc:
            assert exc.status() == "StatusCode.UNAUTHENTICATED"
            return False
        return True

    with server.client() as client:
        assert accepted(TOKEN) and not accepted(OTHER_TOKEN)
        write_atomically(token_file, f"{OTHER_TOKEN}\n".encode())
        scrape.wait_for(lambda: accepted(OTHER_TOKEN), "the new token to be accepted")
        assert not accepted(TOKEN)
        write_atomically(token_file, f"{TOKEN}\n{OTHER_TOKEN}\n".encode())
        scrape.wait_for(lambda: accepted(TOKEN), "the old token to be accepted again")
    assert OTHER_TOKEN not in server.output()


def test_a_rotated_certificate_is_served_to_new_connections_without_dropping_requests(
        server: ServerProcess, pki: Pki) -> None:
    old = serial_of(pki.server_cert)
    http_port = int(server.http.split(":")[1])
    assert served_serial(server.grpc_port, pki) == served_serial(http_port, pki) == old

    # Requests keep flowing on a connection made before the rotation.
    failures: list[BaseException] = []
    answered = 0
    stop = threading.Event()

    def traffic() -> None:
        nonlocal answered
        with server.client() as client:
            while not stop.is_set():
                try:
                    infer(client, MODEL, {"image": IMAGES}, headers=bearer(TOKEN))
                    answered += 1
                except BaseException as exc:
                    failures.append(exc)

    worker = threading.Thread(target=traffic)
    worker.start()
    try:
        rotated = pki.ca.issue_cert("127.0.0.1", "localhost")
        new = serial_of(rotated)
        assert new != old
        write_leaf(rotated, pki.folder, "server")  # the files the server was started with
        scrape.wait_for(lambda: served_serial(server.grpc_port, pki) == new,
                        "gRPC to serve the new certificate", timeout=15)
        scrape.wait_for(lambda: served_serial(http_port, pki) == new,
                        "HTTP to serve the new certificate", timeout=15)
    finally:
        stop.set()
        worker.join(30)
    assert not failures, failures[:3]
    assert answered > 0
    # New clients trust it (same CA) and are served.
    with server.client() as client:
        infer(client, MODEL, {"image": IMAGES}, headers=bearer(TOKEN))
    with http_client(server, pki) as client:
        http_infer(client, headers=bearer(TOKEN))
    assert "TLS certificate reloaded" in server.output()


def test_readiness_errors_name_nothing_the_caller_did_not_send(server: ServerProcess,
                                                               pki: Pki) -> None:
    """Issue 18: ModelReady and /v2/models/<m>/ready answer without a token, and their
    errors listed every model, endpoint, version and label the server has."""
    asked = [("ghost", ""), (f"{MODEL}.nope", ""), (MODEL, "7"), (f"{MODEL}.nope", "7")]
    with server.client() as client:
        for name, version in asked:
            with pytest.raises(InferenceServerException) as info:
                client.is_model_ready(name, version)
            assert info.value.status() == "StatusCode.NOT_FOUND"
            message = info.value.message()
            assert "no model" in message and name[:5] in message, message
            for secret in ("serving_default", "versions", "labels", "endpoints", "1"):
                assert secret not in message, message
            if name == "ghost":
                assert MODEL not in message, message
    for name, version in asked:
        path = f"/v2/models/{name}" + (f"/versions/{version}" if version else "") + "/ready"
        status, answer, _ = rest(server, pki, path)
        assert status == 404 and "served" in answer["error"], answer
        assert "serving_default" not in answer["error"] and "labels" not in answer["error"]


# ---- the repository API's own tokens ------------------------------------------------------

ADMIN_TOKEN = "adm-51c0de"


@pytest.fixture(scope="module")
def admin_server(start_process, repository: Path, token_file: Path,
                 tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    """Plaintext; inference tokens, and admin tokens for the repository API."""
    admin = tmp_path_factory.mktemp("admin") / "admin-tokens"
    admin.write_text(f"{ADMIN_TOKEN}\n")
    http = free_port()
    server = start_process(repository, "--http-port", str(http), "--auth-token-file",
                           str(token_file), "--admin-token-file", str(admin),
                           "--model-control-mode", "explicit", "--load-model", MODEL)
    server.http = f"http://127.0.0.1:{http}"
    return server


def test_only_an_admin_token_loads_and_unloads(admin_server: ServerProcess) -> None:
    """Issue 18: with --auth-token-file, any inference token could unload any model."""
    def post(path: str, token: str) -> int:
        request = urllib.request.Request(admin_server.http + path, method="POST", data=b"{}",
                                         headers=bearer(token))
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code

    with admin_server.client() as client:
        for token in (TOKEN, WRONG):
            assert grpc_status(lambda t=token: client.unload_model(
                MODEL, headers=bearer(t))) == "StatusCode.UNAUTHENTICATED"
            assert grpc_status(lambda t=token: client.get_model_repository_index(
                headers=bearer(t))) == "StatusCode.UNAUTHENTICATED"
            assert post(f"/v2/repository/models/{MODEL}/unload", token) == 401
            assert post("/v2/repository/index", token) == 401
        assert client.is_model_ready(MODEL)
        infer(client, MODEL, {"image": IMAGES}, headers=bearer(TOKEN))
        # The admin token opens the repository API, and nothing else.
        assert grpc_status(lambda: infer(client, MODEL, {"image": IMAGES},
                                         headers=bearer(ADMIN_TOKEN))) \
            == "StatusCode.UNAUTHENTICATED"
        client.unload_model(MODEL, headers=bearer(ADMIN_TOKEN))
        assert not client.is_model_ready(MODEL)
        assert post(f"/v2/repository/models/{MODEL}/load", ADMIN_TOKEN) == 200
        assert client.is_model_ready(MODEL)
        index = client.get_model_repository_index(headers=bearer(ADMIN_TOKEN))
        assert [m.name for m in index.models] == [MODEL]
    assert ADMIN_TOKEN not in admin_server.output()


# ---- mutual TLS ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mtls_server(start_process, repository: Path, pki: Pki) -> ServerProcess:
    """Client certificates required, configured through the env twins; no tokens."""
    server = start_process(
        repository, "--http-port", str(free_port()),
        client_options={"ssl": True, "root_certificates": str(pki.ca_file),
                        "private_key": str(pki.client_key_file),
                        "certificate_chain": str(pki.client_cert_file)},
        TAPSERVE_TLS_CERT_FILE=str(pki.cert_file), TAPSERVE_TLS_KEY_FILE=str(pki.key_file),
        TAPSERVE_TLS_CLIENT_CA_FILE=str(pki.ca_file))
    server.http = logged_port(server, "HTTP on")
    assert "client certificates required" in server.output()
    return server


def test_mutual_tls_needs_a_client_certificate_from_the_ca(
        mtls_server: ServerProcess, pki: Pki, expected: np.ndarray) -> None:
    with mtls_server.client() as client:
        recon = infer(client, MODEL, {"image": IMAGES}).as_numpy("recon")
        np.testing.assert_allclose(recon, expected, rtol=1e-5, atol=1e-6)
    for options in ({}, {"private_key": str(pki.stranger_key_file),
                         "certificate_chain": str(pki.stranger_cert_file)}):
        with grpcclient.InferenceServerClient(
                mtls_server.url, ssl=True, root_certificates=str(pki.ca_file),
                **options) as client, pytest.raises(InferenceServerException):
            client.is_server_live(client_timeout=5)

    with http_client(mtls_server, pki, certfile=str(pki.client_cert_file),
                     keyfile=str(pki.client_key_file)) as client:
        np.testing.assert_allclose(http_infer(client), expected, rtol=1e-5, atol=1e-6)
    assert rest(mtls_server, pki, "/v2/health/ready", client_cert=True)[0] == 200
    with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
        rest(mtls_server, pki, "/v2/health/ready")
    # The refused handshakes disturbed nothing.
    with mtls_server.client() as client:
        assert client.is_server_ready()


# ---- start-up errors --------------------------------------------------------------------


def test_unusable_tls_settings_stop_the_server_with_a_reason(repository: Path, pki: Pki,
                                                             tmp_path: Path) -> None:
    def serve(*flags: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(TAPSERVE), "serve", "--model-repository", str(repository), "--host",
             "127.0.0.1", "--grpc-port", "0", "--metrics-port", "0", "--http-port", "0",
             *flags], capture_output=True, text=True, timeout=120)

    result = serve("--tls-cert-file", str(pki.cert_file))
    assert result.returncode == 2 and "needs both --tls-cert-file and --tls-key-file" \
        in result.stderr, result.stderr
    # A key that is not the certificate's: refused before any port opens.
    result = serve("--tls-cert-file", str(pki.cert_file),
                   "--tls-key-file", str(pki.client_key_file))
    assert result.returncode == 2, result.stderr
    assert "cannot start" in result.stderr and str(pki.cert_file) in result.stderr
    assert "serving gRPC" not in result.stderr
    result = serve("--auth-token-file", str(tmp_path / "missing"))
    assert result.returncode == 2 and "cannot read the token file" in result.stderr
