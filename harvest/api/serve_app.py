"""The Ray Serve ingress: the OpenAI-compatible app over `RayBackend`.

The FastAPI app is built once, around a backend that connects lazily: the controller and
the tokenizer are looked up in the replica process on first use, not when the deployment
is defined (the definition is pickled and shipped to the replica).
"""

from __future__ import annotations

from typing import Any

from ray import serve

from harvest.api.app import build_app
from harvest.api.ray_backend import RayBackend
from harvest.serving import freeze_heap

INGRESS_NAME = "harvest-ingress"
APP_NAME = "harvest"


class LazyRayBackend:
    """A `RayBackend` created on first use inside the replica."""

    def __init__(self, model: str, model_name: str) -> None:
        self.model = model
        self.model_name = model_name
        self._backend: RayBackend | None = None

    def _get(self) -> RayBackend:
        if self._backend is None:
            import ray

            from controller.controller import CONTROLLER_NAME, NAMESPACE

            controller = ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
            self._backend = RayBackend(controller, self.model, self.model_name)
            freeze_heap()  # start-up is over: Ray, FastAPI and the tokenizer are loaded
        return self._backend

    def model_names(self) -> list[str]:
        return [self.model_name]

    def __getattr__(self, name: str) -> Any:  # tokenizer, max_model_len, generate, abort, health, metrics
        if name.startswith("_"):  # pickling probes dunders before __dict__ is restored
            raise AttributeError(name)
        return getattr(self._get(), name)


def serve_application(model: str, model_name: str, api_key: str | None = None, num_replicas: int = 1):
    app = build_app(LazyRayBackend(model, model_name), api_key)

    @serve.deployment(
        name=INGRESS_NAME,
        num_replicas=num_replicas,
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=1000,
    )
    @serve.ingress(app)
    class Ingress:
        pass

    return Ingress.bind()
