"""A mutating admission webhook served over HTTPS from the test process.

The API server calls it like any webhook: POST of an ``admission.k8s.io/v1``
AdmissionReview. It records every review and answers with the JSON Patch the test
chose, so a test sees both what the API server sent and what it made of the answer.
"""

from __future__ import annotations

import base64
import json
import ssl
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from k8sharness.pki import CertificateAuthority

#: Decides the JSON Patch for one AdmissionRequest (``request`` of the review).
PatchFor = Callable[[dict[str, Any]], list[dict[str, Any]]]


class WebhookServer:
    """An HTTPS server on ``host`` with a certificate from its own CA (``ca_bundle``)."""

    def __init__(self, workdir: Path, patch_for: PatchFor, *, host: str = "127.0.0.1") -> None:
        self.ca = CertificateAuthority(workdir / "webhook-pki", "querywarden-test-webhook-ca")
        serving = self.ca.issue("webhook", common_name=host, hosts=[host], server=True)
        self.patch_for = patch_for
        self.reviews: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        handler = _handler_for(self)
        self._server = ThreadingHTTPServer((host, 0), handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(serving.cert_file, serving.key_file)
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self.url = f"https://{host}:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="admission-webhook", daemon=True
        )

    @property
    def ca_bundle(self) -> str:
        """The CA bundle for the webhook's ``clientConfig``, base64-encoded PEM."""
        return base64.b64encode(self.ca.cert_pem).decode()

    def start(self) -> WebhookServer:
        """Serve in a background thread."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)

    def received(self) -> list[dict[str, Any]]:
        """The AdmissionReviews received so far."""
        with self._lock:
            return list(self.reviews)

    def _review(self, review: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            self.reviews.append(review)
        request = review["request"]
        patch = self.patch_for(request)
        response: dict[str, Any] = {"uid": request["uid"], "allowed": True}
        if patch:
            response["patchType"] = "JSONPatch"
            response["patch"] = base64.b64encode(json.dumps(patch).encode()).decode()
        return {
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "response": response,
        }


def _handler_for(server: WebhookServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            review = json.loads(self.rfile.read(length))
            body = json.dumps(server._review(review)).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            # The API server calls often enough to flood the test output; reviews are
            # recorded in ``reviews`` instead.
            pass

    return Handler
