"""local_s3: a real S3 server on loopback (moto's), for tests and benchmarks of code that
checkpoints to ``s3://``.

Needs ``moto[server]`` and ``boto3`` (the ``test`` extra); knows nothing of checkpoints.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import importlib
import logging
import os
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping

__all__ = ["LocalS3", "local_s3"]

WsgiApp = Any
"""A WSGI application (moto's server, or a wrapper around it)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class LocalS3:
    """A bucket on a running local S3 server."""

    endpoint: str
    """``http://127.0.0.1:<port>``."""
    bucket: str
    url: str
    """``s3://<bucket>``: what ``CheckpointManager``, ``Saver`` and the CLI take."""


@contextlib.contextmanager
def local_s3(
    bucket: str | None = None,
    *,
    environment: Mapping[str, str] | None = None,
    middleware: Callable[[WsgiApp], WsgiApp] | None = None,
) -> Iterator[LocalS3]:
    """Start moto's S3 server on 127.0.0.1 (a free port, a thread of this process), create
    ``bucket`` (a fresh name by default), and point the standard variables of this process
    and its subprocesses at it (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID`` and
    ``AWS_SECRET_ACCESS_KEY`` "testing", ``AWS_REGION`` us-east-1, ``AWS_ALLOW_HTTP``, and
    ``environment``), so that a URL alone reaches the bucket; stop the server and restore
    the variables at the end.

    Usage::

        with local_s3() as s3:
            async with CheckpointManager(f"{s3.url}/run") as manager: ...

    Args:
        bucket: the bucket's name.
        environment: more variables to set while the server runs (moto reads some of its
            own settings from the environment as it serves).
        middleware: wraps moto's WSGI application (to observe every request); returns the
            application the server calls instead.

    Raises:
        ModuleNotFoundError: moto or boto3 is missing: ``pip install 'moto[server]' boto3``.
    """
    moto_app = importlib.import_module("moto.moto_server.werkzeug_app")
    serving = importlib.import_module("werkzeug.serving")
    boto3 = importlib.import_module("boto3")
    werkzeug = logging.getLogger("werkzeug")
    level = werkzeug.level
    werkzeug.setLevel(logging.CRITICAL)  # a line per request, and tracebacks of aborted parts
    # moto's ThreadedMotoServer, built from its public parts so that the application can be
    # wrapped: werkzeug's threaded server with moto's request handler, on a thread of ours.
    app = moto_app.DomainDispatcherApplication(moto_app.create_backend_app)
    server = serving.make_server(
        "127.0.0.1",
        0,
        middleware(app) if middleware is not None else app,
        threaded=True,
        request_handler=moto_app.MotoRequestHandler,
    )
    thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="asyncckpt-local-s3")
    serving_forever = thread.submit(server.serve_forever)
    saved: dict[str, str | None] = {}
    try:
        host, port = server.server_address[:2]
        endpoint = f"http://{host}:{port}"
        env = {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_REGION": "us-east-1",
            "AWS_ALLOW_HTTP": "true",
            **(environment or {}),
        }
        saved = {name: os.environ.get(name) for name in env}
        os.environ.update(env)
        name = bucket or f"asyncckpt-test-{uuid.uuid4().hex[:12]}"
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(
            Bucket=name
        )
        yield LocalS3(endpoint=endpoint, bucket=name, url=f"s3://{name}")
    finally:
        server.shutdown()
        thread.shutdown(wait=True)
        server.server_close()
        serving_forever.result()  # the server's own error, if it failed
        for variable, value in saved.items():
            if value is None:
                os.environ.pop(variable, None)
            else:
                os.environ[variable] = value
        werkzeug.setLevel(level)
