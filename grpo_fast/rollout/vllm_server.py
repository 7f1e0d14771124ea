"""The vLLM rollout server: one vLLM engine in its own process behind a small HTTP/JSON server.

    python -m grpo_fast.rollout.vllm_server --model PATH [--host 127.0.0.1] [--port 8000] ...
    grpo-fast vllm-serve --model PATH ...            (the same main(argv))

Endpoints (JSON in, JSON out; errors are {"error": message} with status 400/500):
    GET  /health              {"status": "ok", "model", "vllm_version", "logprobs_mode", "options",
                               "weights_version", "session"}
    POST /generate            {"prompt_ids": [[int]], "settings": SamplingSettings fields, "seeds": [int] | null,
                               "min_version": int | null, "session": str | null}
                              -> {"completion_ids", "finish_reasons", "stop_reasons", "logprobs",
                                  "policy_versions"}, one per prompt
    POST /update_weights      {"path": directory of *.safetensors, "version": int | null, "session": str | null}
                              -> reload between two engine steps (see below), {"ok", "seconds", "version"}
    POST /reset_prefix_cache  {}
    POST /shutdown            {} -> answers, then the process exits

Requests are served concurrently: every /generate adds its prompts to the one engine as it arrives
(rollout/vllm_loop.py: continuous batching), so the requests of several trainer ranks, or of the
next step while this one finishes, share the engine's batches. A weight update is applied between
two engine steps without waiting for the requests in flight: they are recomputed with the new
weights and go on, and every token reports the version that sampled it ("policy_versions").
A /generate with "min_version" waits until the weights are at least that version (of its
"session": the trainer run that set them), so a trainer rank that does not upload weights itself
samples only after the rank that does has uploaded them.
Only the standard library is used for HTTP (ThreadingHTTPServer): the server is a thin shell
around `vllm.LLM`, with no web framework to install or keep compatible.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List, Optional

import torch

from .vllm_common import VLLMOptions, build_llm, import_vllm, settings_from_json
from .vllm_loop import EngineLoop

# how long a /generate may wait (for its min_version, then for its completions) before it fails
_GENERATE_TIMEOUT = 3600.0


class _State:
    def __init__(self, llm, model: str, options: VLLMOptions):
        self.llm, self.model, self.options = llm, model, options
        self.loop = EngineLoop(llm)
        self.lock = threading.Lock()   # the seed generator
        self.seed_gen = torch.Generator().manual_seed(int(options.seed))
        self.server: Optional[ThreadingHTTPServer] = None


def _make_handler(state: _State):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # quiet: one line per request would drown the trainer's log
            pass

        def _send(self, code: int, obj: Dict[str, Any]):
            body = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _body(self) -> Dict[str, Any]:
            n = int(self.headers.get("Content-Length") or 0)
            return json.loads(self.rfile.read(n).decode()) if n else {}

        def do_GET(self):
            if self.path.rstrip("/") == "/health":
                import vllm
                self._send(200, {"status": "ok", "model": state.model, "vllm_version": vllm.__version__,
                                 "logprobs_mode": state.options.logprobs_mode, "options": state.options.as_dict(),
                                 "weights_version": state.loop.version, "session": state.loop.session})
            else:
                self._send(404, {"error": f"unknown path {self.path}"})

        def do_POST(self):
            path = self.path.rstrip("/")
            try:
                req = self._body()
                if path == "/generate":
                    out = self._generate(req)
                elif path == "/update_weights":
                    out = self._update_weights(req)
                elif path == "/reset_prefix_cache":
                    state.loop.call(lambda llm: llm.reset_prefix_cache())
                    out = {"ok": True}
                elif path == "/shutdown":
                    self._send(200, {"ok": True})
                    threading.Thread(target=state.server.shutdown, daemon=True).start()
                    return
                else:
                    self._send(404, {"error": f"unknown path {self.path}"})
                    return
            except (ValueError, KeyError, TypeError) as e:
                self._send(400, {"error": f"{type(e).__name__}: {e}"})
                return
            except Exception as e:  # the trainer sees the server-side failure instead of a timeout
                traceback.print_exc()
                self._send(500, {"error": f"{type(e).__name__}: {e}"})
                return
            self._send(200, out)

        def _generate(self, req: Dict[str, Any]) -> Dict[str, Any]:
            prompt_ids: List[List[int]] = req["prompt_ids"]
            settings = settings_from_json(req["settings"])
            seeds = req.get("seeds")
            if seeds is None:
                with state.lock:
                    seeds = torch.randint(0, 2 ** 31 - 1, (len(prompt_ids),), generator=state.seed_gen).tolist()
            if len(seeds) != len(prompt_ids):
                raise ValueError(f"{len(seeds)} seeds for {len(prompt_ids)} prompts")
            gen = state.loop.generate(prompt_ids, settings, seeds, min_version=int(req.get("min_version") or 0),
                                      session=req.get("session"), timeout=_GENERATE_TIMEOUT)
            return {"completion_ids": gen.completion_ids, "finish_reasons": gen.finish_reasons,
                    "stop_reasons": gen.stop_reasons, "logprobs": gen.logprobs, "policy_versions": gen.policy_versions}

        def _update_weights(self, req: Dict[str, Any]) -> Dict[str, Any]:
            path = req["path"]
            if not os.path.isdir(path) or not any(f.endswith(".safetensors") for f in os.listdir(path)):
                raise ValueError(f"no *.safetensors in {path!r} (is the directory shared with the trainer?)")
            version = req.get("version")
            version = state.loop.version + 1 if version is None else int(version)

            def reload(llm):
                llm.collective_rpc("reload_weights", kwargs={"weights_path": path})

            seconds = state.loop.call(reload, version=version, session=req.get("session"))
            return {"ok": True, "seconds": seconds, "version": version}

    return Handler


def build_parser() -> argparse.ArgumentParser:
    d = VLLMOptions()
    p = argparse.ArgumentParser(prog="grpo-fast vllm-serve", description="Serve rollouts from vLLM for a trainer "
                                "running with use_vllm=True, vllm_mode='server'.")
    p.add_argument("--model", required=True, help="a local Hugging Face checkpoint directory (config, weights, tokenizer)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--dtype", default=d.dtype)
    p.add_argument("--max-model-len", type=int, default=d.max_model_len)
    p.add_argument("--gpu-memory-utilization", type=float, default=d.gpu_memory_utilization)
    p.add_argument("--kv-cache-gib", type=float, default=d.kv_cache_gib,
                   help="KV-cache size in GiB (CPU default: sized from max-num-seqs x max-model-len)")
    p.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs)
    p.add_argument("--block-size", type=int, default=d.block_size, help="KV-cache block size in tokens")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--logprobs-mode", default=d.logprobs_mode,
                   choices=["processed_logprobs", "raw_logprobs", "processed_logits", "raw_logits"])
    p.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=d.enforce_eager)
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=d.enable_prefix_caching)
    p.add_argument("--num-threads", type=int, default=None, help="torch threads while generating (CPU)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    import_vllm()
    options = VLLMOptions(dtype=args.dtype, max_model_len=args.max_model_len,
                          gpu_memory_utilization=args.gpu_memory_utilization, kv_cache_gib=args.kv_cache_gib,
                          max_num_seqs=args.max_num_seqs, block_size=args.block_size, seed=args.seed, logprobs_mode=args.logprobs_mode,
                          enforce_eager=args.enforce_eager, enable_prefix_caching=args.enable_prefix_caching,
                          num_threads=args.num_threads)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    llm = build_llm(args.model, options)
    state = _State(llm, args.model, options)
    server = ThreadingHTTPServer((args.host, args.port), _make_handler(state))
    server.daemon_threads = True
    state.server = server
    print(f"grpo_fast vLLM server: model {args.model} on http://{args.host}:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        state.loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
