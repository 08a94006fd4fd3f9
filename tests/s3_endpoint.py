"""A real S3 endpoint on 127.0.0.1 for the tests and benchmarks/bench_s3.py: moto's S3 server (the HTTP protocol,
SigV4 signatures checked against one IAM user, listings, multipart uploads), plus a proxy that answers slowly.

Why moto and not a Debian package: Debian (bookworm) ships no standalone S3 server: no MinIO, and its
`radosgw` (Ceph 16) needs a running Ceph cluster (monitors, OSDs) behind it, not something that starts in
seconds on a laptop. moto's server comes from PyPI (`moto[server]`; not yet in an extra, issue 38 is open).

The server runs in a thread of the calling process, so that `stop()` then `start()` is a server restarted
with its objects kept, as a real one keeps them on disk. A subprocess can run it as
`python -m tests.s3_endpoint` (prints the variables to export, serves until killed).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from typing import Iterator

HOST = "127.0.0.1"
REGION = "us-east-1"
USER = "cbd-test"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (closed as soon as it is found)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Endpoint:
    """moto's S3 server on 127.0.0.1:`port`, requests signed by one IAM user's key (others are refused)."""

    def __init__(self, port: int = 0):
        from moto import settings                       # optional (the test extra): imported when used
        from moto.core import DEFAULT_ACCOUNT_ID
        from moto.iam.models import iam_backends
        logging.getLogger("werkzeug").setLevel(logging.ERROR)   # no line per request
        iam = iam_backends[DEFAULT_ACCOUNT_ID]["global"]
        if USER not in iam.users:
            iam.create_user(REGION, USER)
            iam.put_user_policy(USER, "all-s3", json.dumps({"Version": "2012-10-17", "Statement": [
                {"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
            iam.create_access_key(USER)
        key = iam.list_access_keys(USER)[0]
        self.key, self.secret = key.access_key_id, key.secret_access_key
        settings.INITIAL_NO_AUTH_ACTION_COUNT = 0      # every request's signature is checked from now on
        self.port = port or free_port()
        self._server = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def env(self, **changes: str) -> dict[str, str]:
        """The usual AWS variables that point boto / s3fs (and so cbd-cache) at this endpoint."""
        return {"AWS_ENDPOINT_URL": self.url, "AWS_ACCESS_KEY_ID": self.key, "AWS_SECRET_ACCESS_KEY": self.secret,
                "AWS_DEFAULT_REGION": REGION, **changes}

    def start(self) -> "Endpoint":
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server
        app = DomainDispatcherApplication(create_backend_app)
        self._server = make_server(HOST, self.port, app, threaded=True, request_handler=MotoRequestHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the port (a client then meets `connection refused`); the objects stay."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()
            self._server = None

    def make_bucket(self, name: str) -> None:
        import boto3
        boto3.client("s3", endpoint_url=self.url, aws_access_key_id=self.key, aws_secret_access_key=self.secret,
                     region_name=REGION).create_bucket(Bucket=name)

    def objects(self, bucket: str, prefix: str = "") -> dict[str, bytes]:
        """Every object under s3://bucket/prefix, read from the server's own store (no request)."""
        from moto.core import DEFAULT_ACCOUNT_ID
        from moto.s3.models import s3_backends
        keys = s3_backends[DEFAULT_ACCOUNT_ID]["aws"].buckets[bucket].keys
        return {k: keys[k].value for k in list(keys.keys()) if k.startswith(prefix)}


class SlowProxy:
    """A TCP proxy on 127.0.0.1 that holds every response `delay` seconds before passing it on: a server that
    answers slowly. Each connection ends by itself after `delay` (+ its transfer), and `stop()` ends the rest."""

    def __init__(self, target_port: int, delay: float):
        self.target, self.delay = target_port, delay
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((HOST, 0))
        self._sock.listen(16)
        self._sock.settimeout(0.2)
        self.port = self._sock.getsockname()[1]
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def __enter__(self) -> "SlowProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stopped.set()
        self._thread.join()
        self._sock.close()

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._sock.accept()
            except OSError:
                continue
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        with contextlib.closing(client), socket.create_connection((HOST, self.target), timeout=5) as upstream:
            client.settimeout(1)
            try:
                upstream.sendall(client.recv(1 << 20))     # the request (small: a HEAD, a GET, a listing)
                reply = upstream.recv(1 << 20)
            except OSError:
                return
            if not self._stopped.wait(self.delay):          # bounded: the delay, or until stop()
                with contextlib.suppress(OSError):
                    client.sendall(reply)


@contextlib.contextmanager
def environment(changes: dict[str, str]) -> Iterator[None]:
    """os.environ with `changes` for the duration (the AWS variables a command reads)."""
    old = {k: os.environ.get(k) for k in changes}
    os.environ.update(changes)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


if __name__ == "__main__":
    endpoint = Endpoint(int(os.environ.get("PORT", "0"))).start()
    for k, v in endpoint.env().items():
        print(f"export {k}={v}", flush=True)
    while True:
        time.sleep(3600)
