"""The registrar's HTTPS front: stdlib ``ThreadingHTTPServer`` + ``ssl``, JSON API version 1.

Routes (bodies in :mod:`verifier.registrar.messages`)::

    GET  /v1/ca                                   fleet CA certificate (PEM)
    GET  /v1/policy-key                           fleet policy key: TPMT_PUBLIC, Name, PEM (JSON)
    GET  /v1/policy-approvals                     the fleet's approvals of host PCR policies
    GET  /v1/hosts/<host_id>                      an admitted host's AIK and mTLS certificates
    POST /v1/registrations                        start admission → credential challenge
    POST /v1/registrations/<challenge_id>/activation   answer it → certificates

Errors are ``{"error": {"id": ..., "message": ...}}`` with 400 (malformed request), 403
(refused), 404 (unknown route or host), 409 (host conflict), 413 (body too large) or 500.
The TLS certificate is the one ``registrar init`` issued from the fleet CA, so a host that
trusts the fleet CA (fetched once and pinned by fingerprint) trusts the connection.
"""

from __future__ import annotations

import json
import logging
import re
import ssl
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from evidence.errors import ParseError, VtpmError
from verifier.registrar.errors import HostConflict, RegistrationRefused
from verifier.registrar.service import RegistrarService

__all__ = ["MAX_BODY", "RegistrarHttpServer", "make_server"]

MAX_BODY = 64 * 1024
_log = logging.getLogger("vtpm.registrar")
_ACTIVATION = re.compile(r"^/v1/registrations/([^/]+)/activation$")
_HOST = re.compile(r"^/v1/hosts/([^/]+)$")


class RegistrarHttpServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer carrying the service its handlers call."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], service: RegistrarService) -> None:
        self.service = service
        super().__init__(address, _Handler)


class _HttpError(Exception):
    def __init__(self, status: HTTPStatus, error_id: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error_id = error_id


def _status_for(err: VtpmError) -> HTTPStatus:
    if isinstance(err, ParseError):
        return HTTPStatus.BAD_REQUEST
    if isinstance(err, HostConflict):
        return HTTPStatus.CONFLICT
    if isinstance(err, RegistrationRefused):
        return HTTPStatus.FORBIDDEN
    return HTTPStatus.BAD_REQUEST


class _Handler(BaseHTTPRequestHandler):
    server: RegistrarHttpServer
    server_version = "vtpm-registrar/1"
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        _log.info("%s %s", self.address_string(), format % args)

    def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: HTTPStatus, obj: object) -> None:
        self._send(status, json.dumps(obj, sort_keys=True).encode(), "application/json")

    def _error(self, status: HTTPStatus, error_id: str, message: str) -> None:
        self._json(status, {"error": {"id": error_id, "message": message}})

    def _body(self) -> object:
        length_text = self.headers.get("Content-Length")
        if length_text is None or not length_text.isdigit():
            raise _HttpError(HTTPStatus.LENGTH_REQUIRED, "http.length", "Content-Length required")
        length = int(length_text)
        if length > MAX_BODY:
            raise _HttpError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                "http.too_large",
                f"request body: expected at most {MAX_BODY} bytes, got {length}",
            )
        raw = self.rfile.read(length)
        ctype = self.headers.get("Content-Type", "").split(";")[0].strip()
        if ctype != "application/json":
            raise _HttpError(
                HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                "http.content_type",
                f"request body: expected application/json, got {ctype or 'none'}",
            )
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as err:
            raise _HttpError(
                HTTPStatus.BAD_REQUEST, "parse.malformed", f"request body: not JSON ({err})"
            ) from err

    def _dispatch(self, method: str) -> None:
        service = self.server.service
        path = self.path.split("?")[0]
        try:
            if method == "GET" and path == "/v1/ca":
                self._send(HTTPStatus.OK, service.ca_certificate(), "application/x-pem-file")
            elif method == "GET" and path == "/v1/policy-key":
                self._json(HTTPStatus.OK, service.policy_key())
            elif method == "GET" and path == "/v1/policy-approvals":
                self._json(HTTPStatus.OK, service.policy_approvals())
            elif method == "GET" and (m := _HOST.match(path)):
                host = service.host(m.group(1))
                if host is None:
                    raise _HttpError(HTTPStatus.NOT_FOUND, "registrar.unknown_host", "no such host")
                self._json(HTTPStatus.OK, host.to_json())
            elif method == "POST" and path == "/v1/registrations":
                self._json(HTTPStatus.CREATED, service.start(self._body()))
            elif method == "POST" and (m := _ACTIVATION.match(path)):
                self._json(HTTPStatus.OK, service.activate(m.group(1), self._body()))
            else:
                raise _HttpError(
                    HTTPStatus.NOT_FOUND, "http.not_found", f"no route {method} {path}"
                )
        except _HttpError as err:
            self._error(err.status, err.error_id, str(err))
        except VtpmError as err:
            _log.warning("%s %s refused [%s]: %s", method, path, err.id, err)
            self._error(_status_for(err), err.id, str(err))
        except Exception:  # the one place an unknown failure of a request is contained
            _log.exception("%s %s failed", method, path)
            self._error(
                HTTPStatus.INTERNAL_SERVER_ERROR, "registrar.internal", "internal error (logged)"
            )

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")


def make_server(
    service: RegistrarService,
    host: str,
    port: int,
    *,
    certfile: Path,
    keyfile: Path,
) -> RegistrarHttpServer:
    """Bind an HTTPS server (TLS ≥ 1.2) for ``service``; ``port`` 0 picks a free port.

    The caller runs ``serve_forever()`` and later ``shutdown()`` + ``server_close()``.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile=str(certfile), keyfile=str(keyfile))
    server = RegistrarHttpServer((host, port), service)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    return server
