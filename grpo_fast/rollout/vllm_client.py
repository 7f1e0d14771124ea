"""VLLMServerEngine: a client of `grpo-fast vllm-serve` (vllm_server.py; TRL's vllm_mode="server")."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from typing import Any, Dict, Optional

import torch

from .engine import Generation, RolloutEngine, SamplingSettings
from .vllm_common import draw_seeds, settings_to_json, write_safetensors

__all__ = ["VLLMServerEngine", "VLLMServerError"]


class VLLMServerError(RuntimeError):
    """The vLLM server could not be reached, timed out, or answered with an error."""


class VLLMServerEngine(RolloutEngine):
    """Client of a vLLM server (`grpo-fast vllm-serve --model PATH --port N`), over HTTP on
    host:port with urllib; every request has a timeout, so a dead server is an error, not a hang.

    Weights travel through a directory both processes can read (`weights_dir`; when None a fresh
    temporary directory, in /dev/shm when it exists: memory, not disk), written by one trainer
    rank only (`rank` 0): sync_weights writes a complete safetensors copy under a new name
    (temporary name, then one rename) and asks the server to reload from it, which it does between
    two engine steps without draining the requests in flight (vllm_server.py). Every other rank only
    counts the version: its next /generate carries it as "min_version", and the server holds that
    request until rank 0's upload has been applied. Versions are labelled with `session` (the same
    on every rank of a run), so a server that outlived an earlier run is never taken as up to date.

    vLLM 0.32's own weight-transfer engines (vllm.distributed.weight_transfer: NCCL, CUDA IPC and
    their sharded variants) need CUDA on both sides; on CPU the file is the transport. The file
    needs no second rendezvous, works between any two processes and cannot hang in a collective:
    each step is one bounded HTTP request.

    Generations carry the engine's log-probs and, per token, the weights version that sampled it:
    the client may be called from a background thread (asynchronous rollouts) while the trainer's
    thread syncs weights.
    """

    name = "vllm-server"
    supports_async = True

    def __init__(self, host: str = "127.0.0.1", port: int = 8000, *, server_timeout: float = 240.0,
                 request_timeout: float = 600.0, weights_dir: Optional[str] = None, seed: int = 0,
                 base_url: Optional[str] = None, rank: int = 0, session: Optional[str] = None,
                 weights_bytes: int = 0):
        self.base_url = (base_url or f"http://{host}:{port}").rstrip("/")
        self.host, self.port = host, port
        self.request_timeout = float(request_timeout)
        self.rank = int(rank)
        self.session = session or uuid.uuid4().hex
        self._own_dir = weights_dir is None and self.rank == 0
        self.weights_dir = weights_dir or (_temporary_dir(weights_bytes) if self.rank == 0 else None)
        if self.weights_dir is not None:
            os.makedirs(self.weights_dir, exist_ok=True)
        self.weights_version = 0
        self._current: Optional[str] = None
        self._gen = torch.Generator().manual_seed(int(seed))
        self.last_sync_seconds = 0.0
        self.server_info = self.wait_until_up(server_timeout)

    # -- transport
    def _request(self, path: str, payload: Optional[Dict[str, Any]] = None, timeout: Optional[float] = None):
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(self.base_url + path, data=data, method="GET" if data is None else "POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.request_timeout) as r:
                return json.loads(r.read().decode())
        except urllib.error.HTTPError as e:
            body = e.read().decode(errors="replace")
            try:
                body = json.loads(body).get("error", body)
            except ValueError:
                pass
            raise VLLMServerError(f"vLLM server at {self.base_url} answered {e.code} on {path}: {body}") from None
        except (urllib.error.URLError, OSError) as e:   # refused, reset, timed out
            raise VLLMServerError(f"vLLM server at {self.base_url} failed on {path}: {e}. {self._start_hint()}") \
                from None

    def _start_hint(self) -> str:
        return (f"Is it running? Start it with `grpo-fast vllm-serve --model PATH --host {self.host} "
                f"--port {self.port}` (or `python -m grpo_fast.rollout.vllm_server ...`).")

    def wait_until_up(self, timeout: float) -> Dict[str, Any]:
        """Poll /health until the server answers; ConnectionError after `timeout` seconds."""
        deadline = time.monotonic() + float(timeout)
        last: Any = None
        while True:
            left = deadline - time.monotonic()
            try:
                return self._request("/health", timeout=max(0.2, min(5.0, left)))
            except VLLMServerError as e:
                last = e
            if time.monotonic() >= deadline:
                raise ConnectionError(f"vLLM server not reachable at {self.host}:{self.port} ({self.base_url}) after "
                                      f"{timeout:g} s (vllm_server_timeout). {self._start_hint()} "
                                      f"Last error: {last}")
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))

    # -- engine
    def generate(self, prompt_ids, settings: SamplingSettings, *, seed: Optional[int] = None) -> Generation:
        gen = self._gen if seed is None else torch.Generator().manual_seed(int(seed))
        seeds = draw_seeds(gen, len(prompt_ids))
        out = self._request("/generate", {"prompt_ids": [[int(t) for t in p] for p in prompt_ids],
                                          "settings": settings_to_json(settings), "seeds": seeds,
                                          "min_version": self.weights_version, "session": self.session})
        return Generation(completion_ids=out["completion_ids"], finish_reasons=out["finish_reasons"],
                          logprobs=out["logprobs"], stop_reasons=out.get("stop_reasons"),
                          policy_versions=out.get("policy_versions"))

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Rank 0: upload the weights and wait until the server samples with them; other ranks:
        count the version (their next request waits for rank 0's upload on the server)."""
        t0 = time.perf_counter()
        version = self.weights_version + 1
        if self.rank == 0:
            path = os.path.join(self.weights_dir, f"v{version:06d}")
            with torch.no_grad():
                write_safetensors(model, path)
            self._request("/update_weights", {"path": path, "version": version, "session": self.session})
            if self._current is not None:     # the server has moved on: the previous copy can go
                shutil.rmtree(self._current, ignore_errors=True)
            self._current = path
        self.weights_version = version
        self.last_sync_seconds = time.perf_counter() - t0

    def state_dict(self) -> Dict[str, Any]:
        return {"generator": self._gen.get_state()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._gen.set_state(state["generator"])

    def reset_prefix_cache(self) -> None:
        self._request("/reset_prefix_cache", {})

    def shutdown_server(self) -> None:
        """Ask the server process to exit (the trainer does not do this by default)."""
        with contextlib.suppress(VLLMServerError):
            self._request("/shutdown", {}, timeout=10.0)

    def close(self) -> None:
        """Delete the weights folder this client made (a folder it was given stays)."""
        if self._own_dir:
            shutil.rmtree(self.weights_dir, ignore_errors=True)
            self._own_dir = False


def _temporary_dir(weights_bytes: int) -> str:
    """A fresh folder for the weights: in /dev/shm (memory) when it is writable and holds two
    copies with room to spare (a container's is often 64 MB), else in the temporary directory."""
    shm, base = "/dev/shm", None
    if os.path.isdir(shm) and os.access(shm, os.W_OK):
        with contextlib.suppress(OSError):
            if shutil.disk_usage(shm).free > 2 * int(weights_bytes) + (256 << 20):
                base = shm
    return tempfile.mkdtemp(prefix="grpo_fast_vllm_weights_", dir=base)
