"""Triton's model repository control over gRPC, for registry-sync: load, unload, readiness and the
versions loaded. Triton runs with `--model-control-mode=explicit`, so it reads the repository only
when told to load."""
from __future__ import annotations

import time
from typing import Any, Callable, TypeVar

from tritonclient.grpc import InferenceServerClient, InferenceServerException

POLL_S = 0.2
T = TypeVar("T")


class TritonError(Exception):
    """Triton refused or failed a repository request; the message is Triton's."""


class Repository:
    """One Triton server's repository API (blocking calls; registry-sync is a process of its own)."""

    def __init__(self, url: str, timeout_s: float = 30.0) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self._client = InferenceServerClient(url)

    def load(self, model: str) -> None:
        """(Re)load model from the repository: its config and the versions its version_policy names.
        Triton keeps serving what was loaded when the load fails."""
        self._call(f"load {model}", self._client.load_model, model, client_timeout=None)

    def unload(self, model: str) -> None:
        self._call(f"unload {model}", self._client.unload_model, model, client_timeout=self.timeout_s)

    def loaded_versions(self, model: str) -> set[str]:
        """The versions of model Triton has READY."""
        index = self._call("repository index", self._client.get_model_repository_index, client_timeout=self.timeout_s)
        return {m.version for m in index.models if m.name == model and m.state == "READY"}

    def wait_ready(self, model: str, version: str, timeout_s: float) -> None:
        """Return once model's version is READY; TritonError after timeout_s."""
        deadline = time.monotonic() + timeout_s
        while version not in self.loaded_versions(model):
            if time.monotonic() >= deadline:
                raise TritonError(f"{model} version {version} not READY after {timeout_s:g} s")
            time.sleep(POLL_S)

    def close(self) -> None:
        self._client.close()

    def _call(self, what: str, method: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        try:
            return method(*args, **kwargs)
        except InferenceServerException as e:
            raise TritonError(f"Triton at {self.url}: {what}: {e.message() or e}") from None
