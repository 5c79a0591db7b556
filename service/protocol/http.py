"""The HTTP port (aiohttp, on the gRPC server's event loop): KServe v2 REST and TensorFlow
Serving's REST API over the one data plane. Each handler is convert → data plane →
convert back; domain errors become HTTP statuses here and nowhere else."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import numpy as np
import orjson
from aiohttp import web

from service.auth import Access
from service.errors import (
    Cancelled,
    InvalidInput,
    NotFound,
    TapserveError,
    Unauthenticated,
    clip,
)
from service.protocol import convert, kserve_rest, tfserving_rest
from service.protocol.status import INTERNAL_MESSAGE
from service.protocol.tfserving import PROTOCOL_REST, endpoint_of
from service.tracing import NO_TRACING, RequestTrace, Tracing
from service.types import DataPlane

log = logging.getLogger(__name__)

KSERVE = "kserve_http"
# SPEC's HTTP table: the gRPC codes as HTTP statuses.
STATUS = {"INVALID_ARGUMENT": 400, "NOT_FOUND": 404, "RESOURCE_EXHAUSTED": 429,
          "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504, "UNAUTHENTICATED": 401,
          "UNIMPLEMENTED": 501, "CANCELLED": 499}
T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(status: int, message: str) -> web.Response:
    return json_response({"error": message}, status=status)


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except TapserveError as exc:
        if exc.code in STATUS:
            response = error_response(STATUS[exc.code], str(exc))
            if isinstance(exc, Unauthenticated):  # RFC 6750: say which scheme is wanted
                response.headers["WWW-Authenticate"] = 'Bearer realm="tapserve"'
            return response
        log.exception("unhandled error in %s %s", request.method, request.path)
        return error_response(500, INTERNAL_MESSAGE)
    except web.HTTPException as exc:  # no such route (404), body too large (413), ...
        if exc.status < 400:
            raise
        reason = (exc.reason if exc.status != 404
                  else f"no route {request.method} {clip(request.path)}")
        return error_response(exc.status, reason)
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return error_response(500, INTERNAL_MESSAGE)


def _bearer_token(access: Access, routes: _Routes) -> Callable[..., Any]:
    """Every route but health needs a token, checked before the body is read; the
    repository API an admin token if there are any. Refused inference calls are counted
    under their model (read from the path)."""
    open_routes = {routes.live, routes.ready, routes.model_ready}
    repository = {routes.repository_index, routes.load, routes.unload}
    inference = {routes.infer: KSERVE, routes.tfs_predict: PROTOCOL_REST}

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        route = request.match_info.handler
        tokens = access.needed(route in repository)
        if route in open_routes or tokens is None:
            return await handler(request)
        try:
            tokens.check(request.headers.get("Authorization"))
        except Unauthenticated as exc:
            if route in inference:
                routes.refused(inference[route], request, exc)
            raise
        return await handler(request)

    return check


def _body_limits(max_request_bytes: int, budget: int, timeout: float) -> Callable[..., Any]:
    """Bodies being received share a byte budget: each reserves its bytes as they arrive,
    not the length it announces, so a client that sent 10 bytes holds 10 bytes, and many
    stalled uploads cannot hold more than `budget` between them; a body whose next bytes do
    not fit is refused (429). A body must arrive within `timeout` seconds (408). Both 0:
    off. A body larger than `max_request_bytes` is refused (413), before it is read if it
    says its length."""
    reserved = 0

    @web.middleware
    async def limit(request: web.Request, handler: Handler) -> web.StreamResponse:
        nonlocal reserved
        if not request.body_exists:
            return await handler(request)
        if (request.content_length or 0) > max_request_bytes:
            return _closing(_too_large(max_request_bytes))
        held = 0  # bytes of the budget this request holds, until it is answered
        try:
            body = bytearray()
            try:
                async with asyncio.timeout(timeout or None):
                    while chunk := await request.content.readany():
                        if held + len(chunk) > max_request_bytes:
                            return _closing(_too_large(max_request_bytes))
                        if budget and reserved + len(chunk) > budget:
                            return _closing(error_response(429, (
                                f"the server is receiving {reserved} bytes of request bodies, "
                                f"its limit is {budget} (--max-receiving-bytes): retry later")))
                        reserved += len(chunk)
                        held += len(chunk)
                        body += chunk
            except TimeoutError:
                return _closing(error_response(408, f"the request body did not arrive within "
                                               f"{timeout:g} s (--request-read-timeout-secs)"))
            except ConnectionResetError:  # the client went away: no traceback in the log
                raise Cancelled("the client closed the connection during its body") from None
            # What the handler's read() returns: aiohttp keeps a body it read there.
            request._read_bytes = bytes(body)
            del body
            return await handler(request)
        finally:
            reserved -= held

    return limit


def _too_large(max_request_bytes: int) -> web.Response:
    return error_response(413, f"the request body is larger than {max_request_bytes} bytes "
                          "(--max-request-bytes)")


def _closing(response: web.Response) -> web.Response:
    """`response`, closing the connection after it: the rest of the body is not worth
    waiting for."""
    response.force_close()
    return response


def build_app(dataplane: DataPlane, max_request_bytes: int, access: Access | None = None,
              body_budget: int = 0, read_timeout: float = 0,
              tracing: Tracing = NO_TRACING) -> web.Application:
    """The aiohttp application serving both REST APIs (with `access`: behind bearer tokens;
    `body_budget` and `read_timeout`: see _body_limits)."""
    routes = _Routes(dataplane, access, tracing)
    middlewares = [_errors] + ([_bearer_token(access, routes)] if access else []) + [
        _body_limits(max_request_bytes, body_budget, read_timeout)]
    app = web.Application(client_max_size=max_request_bytes, middlewares=middlewares)
    model = "/v2/models/{model}"
    versioned = "/v2/models/{model}/versions/{version}"
    app.add_routes([
        web.get("/v2/health/live", routes.live),
        web.get("/v2/health/ready", routes.ready),
        web.get("/v2", routes.server_metadata),
        web.get("/v2/models/stats", routes.statistics),  # before /v2/models/{model}
        *[web.get(base + "/stats", routes.statistics) for base in (model, versioned)],
        *[web.get(base, routes.model_metadata) for base in (model, versioned)],
        *[web.get(base + "/ready", routes.model_ready) for base in (model, versioned)],
        *[web.post(base + "/infer", routes.infer) for base in (model, versioned)],
        web.post("/v2/repository/index", routes.repository_index),
        web.post("/v2/repository/models/{model}/load", routes.load),
        web.post("/v2/repository/models/{model}/unload", routes.unload),
    ])
    tfs = "/v1/models/{model:[^/:]+}"
    for suffix in ("", "/versions/{version:[0-9]+}", "/labels/{label:[^/:]+}"):
        app.add_routes([
            web.get(tfs + suffix, routes.tfs_status),
            web.get(tfs + suffix + "/metadata", routes.tfs_metadata),
            web.post(tfs + suffix + ":predict", routes.tfs_predict),
        ])
    return app


class _Routes:
    def __init__(self, dataplane: DataPlane, access: Access | None = None,
                 tracing: Tracing = NO_TRACING) -> None:
        self._dataplane = dataplane
        self._access = access
        self._tracing = tracing

    def refused(self, protocol: str, request: web.Request, error: TapserveError) -> None:
        """Count and log an inference request refused before it was read (no token)."""
        name = request.match_info["model"]
        if protocol == KSERVE:
            model, endpoint = convert.client_names(name)
        else:
            model, endpoint = name, None  # its signature_name is in the body, not read
        self._dataplane.refused(protocol, model, endpoint, error)

    # KServe v2

    async def live(self, request: web.Request) -> web.Response:
        return json_response({"live": True}) if self._dataplane.live() else \
            error_response(503, "the server is not live")

    async def ready(self, request: web.Request) -> web.Response:
        if self._dataplane.ready():
            return json_response({"ready": True})
        why = self._dataplane.not_ready()
        models = [f"{model} ({state})" for model, state in why if model]
        if models and self._access is not None:  # asked without a token: no model names
            models = [f"{len(models)} model(s) loading or unable to serve (the repository "
                      "index names them)"]
        said = [state for model, state in why if not model] + models
        return error_response(503, "the server is not ready: " + "; ".join(said or ["starting"]))

    async def server_metadata(self, request: web.Request) -> web.Response:
        name, version, extensions = self._dataplane.server_metadata()
        return json_response({"name": name, "version": version, "extensions": extensions})

    def _model(self, request: web.Request) -> tuple[str, str | None, str | None]:
        name = request.match_info["model"]
        model, endpoint = convert.parse_model_name(name)
        return model, endpoint, convert.parse_version(request.match_info.get("version", ""))

    async def model_metadata(self, request: web.Request) -> web.Response:
        model, endpoint, version = self._model(request)
        meta = self._dataplane.model_metadata(model, endpoint, version)
        return json_response(kserve_rest.model_metadata(meta, request.match_info["model"]))

    async def model_ready(self, request: web.Request) -> web.Response:
        model, endpoint, version = self._model(request)
        if self._dataplane.model_ready(model, endpoint, version):
            return json_response({"name": request.match_info["model"], "ready": True})
        return error_response(503, f"model {clip(request.match_info['model'])} is not ready")

    async def infer(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        with self._tracing.request(KSERVE, name, request.headers) as trace:
            return await self._infer(request, name, trace)

    async def _infer(self, request: web.Request, name: str, trace: RequestTrace
                     ) -> web.Response:
        with self._dataplane.call(KSERVE, name) as call:
            body = await request.read()
            model, endpoint = convert.parse_model_name(name)
            version = convert.parse_version(request.match_info.get("version", ""))
            # The endpoint first: its datatypes are checked before any tensor is decoded.
            target = call.resolve(model, endpoint, version)
            infer_request, binary_outputs = await _off_loop_if_large(
                len(body), kserve_rest.decode_request, body,
                request.headers.get(kserve_rest.HEADER_LENGTH), model, endpoint, version,
                target.inputs, target.max_rows)
            infer_request.json = binary_outputs is not None and not (
                infer_request.outputs and set(infer_request.outputs) <= binary_outputs)
            response = await call.infer(infer_request)
            trace.answered(response)
            body, json_length = await _off_loop_if_large(
                _nbytes(response.outputs), kserve_rest.encode_infer, response, name,
                binary_outputs)
        if json_length is None:
            return web.Response(body=body, content_type="application/json")
        return web.Response(body=body, content_type="application/octet-stream",
                            headers={kserve_rest.HEADER_LENGTH: str(json_length)})

    async def statistics(self, request: web.Request) -> web.Response:
        name = request.match_info.get("model", "")
        model = convert.parse_model_name(name)[0] if name else ""
        version = convert.parse_version(request.match_info.get("version", ""))
        return json_response(convert.statistics_document(
            self._dataplane.model_statistics(model, version)))

    async def repository_index(self, request: web.Request) -> web.Response:
        document = await _json(request) if request.can_read_body else {}
        entries = self._dataplane.repository_index(bool(document.get("ready", False)))
        return json_response([
            {"name": n, "version": v, "state": s, "reason": r} for n, v, s, r in entries])

    async def load(self, request: web.Request) -> web.Response:
        await self._dataplane.load_model(self._repository_model(request))
        return json_response({})

    async def unload(self, request: web.Request) -> web.Response:
        await self._dataplane.unload_model(self._repository_model(request))
        return json_response({})

    @staticmethod
    def _repository_model(request: web.Request) -> str:
        model, endpoint = convert.parse_model_name(request.match_info["model"])
        if endpoint is not None:
            raise NotFound(f"no model {clip(request.match_info['model'])}: load a model, "
                           "not an endpoint")
        return model

    # TensorFlow Serving REST

    def _tfs_model(self, request: web.Request) -> tuple[str, str | None]:
        model, endpoint = convert.parse_model_name(request.match_info["model"])
        if endpoint is not None:
            raise NotFound(f"no model {clip(request.match_info['model'])}: name the model alone "
                           "and the endpoint in signature_name")
        info = request.match_info
        version = info.get("version") or info.get("label")
        return model, convert.parse_version(version) if version else None

    async def tfs_status(self, request: web.Request) -> web.Response:
        model, version = self._tfs_model(request)
        return json_response(tfserving_rest.model_status(
            self._dataplane.model_status(model, version)))

    async def tfs_metadata(self, request: web.Request) -> web.Response:
        model, version = self._tfs_model(request)
        number, default, endpoints = self._dataplane.model_endpoints(model, version)
        return json_response(tfserving_rest.model_metadata(model, number, default,
                                                               endpoints))

    async def tfs_predict(self, request: web.Request) -> web.Response:
        with self._tracing.request(PROTOCOL_REST, request.match_info["model"],
                                   request.headers) as trace:
            return await self._tfs_predict(request, trace)

    async def _tfs_predict(self, request: web.Request, trace: RequestTrace) -> web.Response:
        with self._dataplane.call(PROTOCOL_REST,
                                  request.match_info["model"]) as call:
            model, version = self._tfs_model(request)
            body = await request.read()
            document = await _off_loop_if_large(len(body), kserve_rest.json_object, body)
            signature = document.get("signature_name", "")
            if not isinstance(signature, str):
                raise InvalidInput("signature_name must be a string")
            target = call.resolve(model, endpoint_of(signature), version)
            infer_request, row_format = await _off_loop_if_large(
                len(body), tfserving_rest.decode_predict, document, model, version, target)
            infer_request.json = True
            response = await call.infer(infer_request)
            trace.answered(response)
            body = await _off_loop_if_large(_nbytes(response.outputs), lambda: orjson.dumps(
                tfserving_rest.encode_predict(response.outputs, row_format),
                option=orjson.OPT_SERIALIZE_NUMPY))
        return web.Response(body=body, content_type="application/json")


async def _off_loop_if_large(size: int, decode: Callable[..., T], *args: object) -> T:
    """decode(*args) on the event loop for a small body, on a thread for a large one:
    millions of JSON values, read or written, must not stall every other request."""
    if size <= convert.DECODE_INLINE_BYTES:
        return decode(*args)
    return await asyncio.to_thread(decode, *args)


def _nbytes(outputs: dict[str, np.ndarray]) -> int:
    return sum(a.nbytes for a in outputs.values())


async def _json(request: web.Request) -> dict[str, Any]:
    return kserve_rest.json_object(await request.read())


def json_response(value: Any, status: int = 200) -> web.Response:
    """JSON with numpy arrays written natively (orjson)."""
    return web.Response(body=orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY),
                        status=status, content_type="application/json")
