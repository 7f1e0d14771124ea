"""Rollout engines: token ids and sampling settings in; per sample the sampled ids, the engine's
log-probs and a finish reason out.

    RolloutEngine   the interface every trainer samples through
    HFEngine        Hugging Face `generate` on the policy itself (the default, name "hf")
    HFCopyEngine    `generate` on a copy of the policy, for a producer running beside the trainer
                    (asynchronous rollouts, max_staleness > 0)
    (vllm_colocate.py and vllm_client.py hold the vLLM engines; registry.py builds one by name)

An engine knows nothing about rewards, advantages, losses, chat templates or groups: it gets one
token-id list per sample (the producer has already repeated each prompt for its group) and
samples one completion for each. After an optimiser step changes the policy, the trainer calls
`sync_weights(model)`; an engine that samples from the policy module itself (HFEngine) has
nothing to do. `state_dict` / `load_state_dict` hold what a resumed run needs to sample the same
way (a seed generator); `close` releases processes, caches and temporary files.

Asynchronous rollouts (train/async_batches.py) call `generate` from a background thread while the
trainer updates the policy and calls `sync_weights` from its own thread. An engine that allows this
sets `supports_async`: its `sync_weights` never waits for a generate call to end (the weights reach
it between requests, or between engine steps), and its generations say which weights sampled each
token (`Generation.policy_versions`, counted in `weights_version`: its number of `sync_weights`).
"""
from __future__ import annotations

import contextlib
import copy
import threading
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from transformers import GenerationConfig

__all__ = ["Generation", "HFCopyEngine", "HFEngine", "RolloutEngine", "SamplingSettings", "left_pad", "right_pad"]


@dataclass(frozen=True)
class SamplingSettings:
    """How to sample one completion; field names and meanings as in TRL's GRPOConfig / vLLM."""

    max_tokens: int                      # max_completion_length (of this call)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                       # 0: no top-k
    min_p: Optional[float] = None        # None: off
    repetition_penalty: float = 1.0
    stop_token_ids: Tuple[int, ...] = ()  # besides the EOS token: sampling one of these ends the completion
    stop: Tuple[str, ...] = ()           # stop strings: the completion ends once its text contains one


@dataclass
class Generation:
    """What an engine returns for N prompts: one completion each, in order.

    finish_reasons[i] is "stop" (EOS, a stop token or a stop string ended it; the ids end with
    it) or "length" (max_tokens reached); stop_reasons[i] says which stop: None for EOS, the
    token id, or the stop string.
    """

    completion_ids: List[List[int]]               # (N,) sampled token ids
    finish_reasons: List[str]                     # (N,) "stop" | "length"
    logprobs: Optional[List[List[float]]] = None  # (N,) the engine's log-prob of each sampled token, or None
    stop_reasons: Optional[List[Any]] = None      # (N,) None (EOS) | token id | stop string
    policy_versions: Optional[List[List[int]]] = None  # (N,) the engine's weights_version that sampled each token


class RolloutEngine:
    """The interface. Subclasses implement generate(); the rest has defaults that hold nothing."""

    name = "base"
    supports_async = False   # generate may run in another thread while sync_weights runs (module docstring)
    weights_version = 0      # sync_weights calls so far: the unit of Generation.policy_versions

    def generate(self, prompt_ids: Sequence[Sequence[int]], settings: SamplingSettings) -> Generation:
        """One completion per prompt (N prompts in, N completions out, in order)."""
        raise NotImplementedError

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Make the engine sample from `model`'s current weights (called after each optimiser step)."""

    def state_dict(self) -> Dict[str, Any]:
        """What a checkpoint must hold for a resumed run to sample as the interrupted one would."""
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore state_dict()."""

    def close(self) -> None:
        """Release what the engine holds (processes, caches, temporary files); idempotent."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _trim(row: List[int], stops: Sequence[int]):
    """(ids up to and including the first stop token, finish reason, stop reason)."""
    for i, t in enumerate(row):
        if t in stops:
            return row[:i + 1], "stop", t
    return row, "length", None


class HFEngine(RolloutEngine):
    """transformers' `generate` on the policy module (left padding, sampling, stop at EOS, at
    settings.stop_token_ids and at settings.stop strings).

    It samples from the live policy, so sync_weights has nothing to do; randomness comes from
    the global torch generator (the trainer scopes it to its own state, see TrainerRNG).
    `autocast`: a context factory generation runs under (the trainer's bf16 / fp16 autocast, as
    TRL generates with the autocast-wrapped model), or None.
    """

    name = "hf"

    def __init__(self, model: torch.nn.Module, *, eos_token_id: int, pad_token_id: int,
                 device: torch.device, synced_gpus: bool = False, tokenizer=None, return_logprobs: bool = False,
                 autocast=None):
        self.model = model
        self.autocast = autocast or contextlib.nullcontext
        self.eos_token_id, self.pad_token_id = int(eos_token_id), int(pad_token_id)
        self.device = device
        self.synced_gpus = synced_gpus  # FSDP2: every forward is a collective, ranks step together
        self.tokenizer = tokenizer      # needed for stop strings only
        # the log-prob of each sampled token under the distribution it was drawn from (the processed
        # scores: temperature, top-k / top-p / min-p, repetition penalty), as vLLM's processed_logprobs
        self.return_logprobs = return_logprobs

    def generate(self, prompt_ids, settings: SamplingSettings) -> Generation:
        ids, mask = left_pad(prompt_ids, self.pad_token_id, self.device)          # (N, L)
        stops = (self.eos_token_id,) + tuple(int(t) for t in settings.stop_token_ids)
        kw = dict(do_sample=True, temperature=settings.temperature, top_p=settings.top_p,
                  top_k=settings.top_k, max_new_tokens=settings.max_tokens, pad_token_id=self.pad_token_id,
                  eos_token_id=list(stops) if len(stops) > 1 else self.eos_token_id,
                  repetition_penalty=settings.repetition_penalty, use_cache=True)
        if settings.min_p is not None:
            kw["min_p"] = settings.min_p
        extra: Dict[str, Any] = {"synced_gpus": True} if self.synced_gpus else {}
        if self.return_logprobs:
            kw.update(return_dict_in_generate=True, output_scores=True)
        if settings.stop:
            if self.tokenizer is None:
                raise ValueError("stop strings need the tokenizer: HFEngine(..., tokenizer=...)")
            kw["stop_strings"] = list(settings.stop)
            extra["tokenizer"] = self.tokenizer
        model = self.model
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), self.autocast():
                out = model.generate(input_ids=ids, attention_mask=mask, generation_config=GenerationConfig(**kw),
                                     **extra)
        finally:
            model.train(was_training)
        scores = None
        if self.return_logprobs:
            out, scores = out.sequences, out.scores
        ids_out, reasons, why = [], [], []
        for row in out[:, ids.shape[1]:].tolist():                               # (N, T) padded after a stop
            row, reason, token = _trim(row, stops)
            stop = None if token == self.eos_token_id else token
            if settings.stop:  # a stop string before the first stop token ends the completion there
                n, s = self._stop_string_end(row, settings.stop)
                if n is not None and (n < len(row) or reason == "length"):
                    row, reason, stop = row[:n], "stop", s
            ids_out.append(row)
            reasons.append(reason)
            why.append(stop)
        logprobs = None if scores is None else _sampled_logprobs(scores, out[:, ids.shape[1]:], ids_out)
        return Generation(completion_ids=ids_out, finish_reasons=reasons, logprobs=logprobs, stop_reasons=why)

    def _stop_string_end(self, row: List[int], stops: Sequence[str]):
        """(length of the shortest prefix of `row` whose text contains a stop string, that string),
        or (None, None). generate pads a row after a stop string, and the pad id may be a real token
        (EOS), so the padding cannot tell where it stopped."""
        for n in range(1, len(row) + 1):
            text = self.tokenizer.decode(row[:n])
            for s in stops:
                if s in text:
                    return n, s
        return None, None


def _sampled_logprobs(scores, tokens: torch.Tensor, rows: List[List[int]]) -> List[List[float]]:
    """Per row, log_softmax(scores[t])[token t] for the row's kept tokens (scores: one (N, V) per step)."""
    T = min(len(scores), tokens.shape[1])
    if T == 0:
        return [[] for _ in rows]
    logp = torch.stack([torch.log_softmax(scores[t].float(), -1).gather(1, tokens[:, t:t + 1])[:, 0]
                        for t in range(T)], 1).tolist()                           # (N, T)
    return [logp[i][:len(r)] for i, r in enumerate(rows)]


class HFCopyEngine(HFEngine):
    """HFEngine on a copy of the policy, for a producer that generates in a background thread while
    the trainer updates the policy (max_staleness > 0).

    sync_weights copies the policy's weights into a staging buffer and returns at once; the next
    generate call that starts while no other runs copies them into the copy it samples from, so a
    call in progress finishes with the weights it started with (weights reach the producer between
    requests, never mid-request; concurrent calls, evaluation beside the producer, are safe). Each
    completion reports the version it was sampled with, and the log-probs of its tokens (the
    behaviour policy of the importance-sampling correction). Memory: two more copies of the weights
    (the sampling copy and the staging buffer). Sampling draws from the process's global generator,
    which the trainer's thread shares: an asynchronous HF run is not bit-reproducible.
    """

    supports_async = True

    def __init__(self, model: torch.nn.Module, **kw):
        twin = copy.deepcopy(model).requires_grad_(False).eval()
        super().__init__(twin, return_logprobs=True, **kw)
        self._weights = twin.state_dict()                                  # live tensors of the copy
        self._staging = {k: v.detach().clone() for k, v in self._weights.items()}
        self._cv = threading.Condition()
        self._applied = 0
        self._active = 0   # generate calls in progress: the copy's weights change only when there are none
        # CUDA: generate on a stream of its own, so its kernels can run beside the trainer's
        self._stream = torch.cuda.Stream(self.device) if torch.device(self.device).type == "cuda" else None

    def sync_weights(self, model: torch.nn.Module) -> None:
        state = model.state_dict()   # the policy as the trainer holds it (no DDP wrapper)
        with torch.no_grad(), self._cv:
            for k, buf in self._staging.items():
                buf.copy_(state[k])
            if self._stream is not None:   # the staging copy is complete before a producer reads it
                torch.cuda.current_stream(self.device).synchronize()
            self.weights_version += 1

    def generate(self, prompt_ids, settings: SamplingSettings) -> Generation:
        with contextlib.ExitStack() as scope:
            if self._stream is not None:
                scope.enter_context(torch.cuda.stream(self._stream))
            with torch.no_grad(), self._cv:
                if self._applied != self.weights_version and self._active == 0:
                    for k, t in self._weights.items():
                        t.copy_(self._staging[k])
                    self._applied = self.weights_version
                version = self._applied
                self._active += 1
            try:
                gen = super().generate(prompt_ids, settings)
            finally:
                with self._cv:
                    self._active -= 1
        gen.policy_versions = [[version] * len(row) for row in gen.completion_ids]
        return gen


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device=None):
    """Token-id lists -> (ids, mask) (len(rows), longest) int64 tensors, padded on the left."""
    L = max((len(r) for r in rows), default=0)
    # one tensor constructor over padded lists: a per-row copy costs ~20 us a row (3 ms a step here)
    ids = torch.tensor([[int(pad_id)] * (L - len(r)) + list(r) for r in rows], dtype=torch.long).reshape(len(rows), L)
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    mask = (torch.arange(L)[None, :] >= (L - lengths)[:, None]).long()
    return ids.to(device), mask.to(device)


def right_pad(rows: Sequence[Sequence], pad, dtype=torch.long, device=None, width: Optional[int] = None):
    """Lists -> (len(rows), width or longest) tensor padded on the right with `pad`."""
    T = max((len(r) for r in rows), default=0) if width is None else width
    out = torch.tensor([list(r) + [pad] * (T - len(r)) for r in rows], dtype=dtype).reshape(len(rows), T)
    return out.to(device)
