"""A local Ray with loraserve's Ray Serve application behind Serve's HTTP proxy on loopback, for the cluster
tests: started for a module (starting it is the slow part: each engine replica loads torch and its model)
and always taken down, Ray included."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import ray
from ray import serve

from loraserve.cluster.app import build
from loraserve.cluster.config import ClusterConfig
from loraserve.cluster.local import APP_NAME
from loraserve.tools.loadtest.server import free_port


@contextmanager
def serving(config: ClusterConfig) -> Iterator[str]:
    """The application's base URL while it runs. Ray's replicas inherit this process's environment (an S3
    endpoint, say) as it is when this is entered."""
    port = free_port()
    with warnings.catch_warnings():
        # Ray's own deprecation chatter at start-up is not ours to fix; the suite turns warnings into errors.
        warnings.simplefilter("ignore")
        ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            serve.run(build(config), name=APP_NAME, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            serve.shutdown()
            ray.shutdown()
