"""MultiTurnProducer: rollouts in which the model calls tools (TRL's `tools=` and
`environment_factory=`), turn by turn, on any engine.

Per sample (each row's prompt repeated group_size times, one environment instance each):

    reset    the environment's reset(**row); its text is appended to the last user message
    render   the prompt with the sample's tools (standalone tools + its environment's methods)
    loop     generate one assistant turn (every active sample in one engine call)
             -> parse its tool calls (tool_calls.parse_turn)
             -> no call, the budget spent, or max_tool_calling_iterations rounds done: the sample ends
             -> else run every call of every sample at once, each under the timeout (ToolRunner);
                errors, timeouts, unknown tools and bad arguments become the tool message
             -> append the tool messages' tokens as the template renders them (not sampled), and go on

Tokens. The completion is every token after the prompt: the sampled ids of each turn exactly as the
engine returned them (never decoded and re-encoded), and between them the tool messages' tokens
(chat_turns.TurnTemplate). `sampled` is 1 on the former, 0 on the latter, and the engine's log-probs
are NaN there: the loss, the KL, the entropy, the token normalisers and the importance-sampling
correction see the policy's tokens only, and the reward sits at the last sampled token.

The token budget is max_completion_length over the whole completion, tool tokens included (TRL):
each turn may sample what is left; tool messages that would fill the budget are dropped (the calls
ran, the sample ends on its last turn), as TRL does.

Under FSDP2 the HF engine's generate is a collective: every rank must make the same number of
calls, so with `lockstep_any` (the process group's "any rank still going") a rank whose samples
are all done keeps calling generate on a one-token stand-in until every rank is done.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

from .chat_turns import TurnTemplate
from .data import Rollout, Sample, collate
from .engine import RolloutEngine, SamplingSettings
from .environments import Environments
from .producer import Producer
from .template import is_conversational
from .tool_calls import ToolCall, parse_turn, tool_name
from .tool_runner import ToolJob, ToolRunner

__all__ = ["MultiTurnProducer", "STAND_IN_PROMPT", "tool_content"]

# the prompt of a row that has none (an environment's reset() writes the task), as TRL
STAND_IN_PROMPT = [{"role": "user", "content": ""}]


def tool_content(result: Any) -> Any:
    """A tool's result as its message content (TRL: a list of content blocks as is, else str())."""
    return result if isinstance(result, list) else str(result)


@dataclass
class _Episode:
    """One sample while its turns are made."""

    prompt_ids: List[int]
    tools: List[Callable]
    table: Dict[str, Callable]
    ids: List[int] = field(default_factory=list)
    sampled: List[int] = field(default_factory=list)
    logps: List[float] = field(default_factory=list)
    versions: List[int] = field(default_factory=list)   # the weights version per token, -1 where not sampled
    messages: List[Dict[str, Any]] = field(default_factory=list)
    finish: str = "stop"
    pending: List[ToolCall] = field(default_factory=list)
    calls: int = 0
    failures: int = 0
    turns: int = 0
    seconds: float = 0.0

    def add(self, ids: Sequence[int], sampled: int, logps: Optional[Sequence[float]],
            versions: Optional[Sequence[int]] = None) -> None:
        self.ids.extend(int(t) for t in ids)
        self.sampled.extend([sampled] * len(ids))
        self.logps.extend([math.nan] * len(ids) if logps is None else [float(x) for x in logps])
        self.versions.extend([-1] * len(ids) if versions is None else [int(v) for v in versions])


class MultiTurnProducer(Producer):
    """Samples multi-turn rollouts with tools (module docstring)."""

    def __init__(self, engine: RolloutEngine, turns: TurnTemplate, *, tools: Sequence[Callable] = (),
                 environments: Optional[Environments] = None, runner: ToolRunner,
                 max_tool_calling_iterations: Optional[int] = None, device, omit_prompt: bool = False,
                 lockstep_any: Optional[Callable[[bool], bool]] = None):
        self.engine, self.turns, self.device = engine, turns, device
        self.tokenizer = turns.tokenizer
        self.tools, self.environments, self.runner = list(tools), environments, runner
        self.max_rounds = math.inf if max_tool_calling_iterations is None else int(max_tool_calling_iterations)
        self.omit_prompt = omit_prompt          # rows had no prompt: reset() does not receive the stand-in
        self.lockstep_any = lockstep_any

    def close(self) -> None:
        self.runner.close()

    # ------------------------------------------------------------------ the rollout
    def _start(self, rows, G):
        """(prompts after reset, episodes, environment instances or None) of every sample."""
        envs = self.environments.draw(rows, G) if self.environments is not None else None
        prompts, episodes, rendered = [], [], {}
        for j, row in enumerate(rows):
            base = row.get("prompt", STAND_IN_PROMPT)
            if not is_conversational(base):
                raise TypeError(f"tools and environments need chat prompts (a list of messages with roles); row "
                                f"{j} of the step has {type(base).__name__}: {str(base)[:80]!r}")
            for g in range(G):
                env = None if envs is None else envs[j * G + g]
                prompt = copy.deepcopy(list(base)) if env is None else \
                    self.environments.reset(env, row, copy.deepcopy(list(base)), omit_prompt=self.omit_prompt)
                tools = self.tools + ([] if env is None else Environments.tools(env))
                key = (repr(prompt), tuple(tool_name(t) for t in tools))
                if key not in rendered:    # the G samples of a row usually share their prompt
                    rendered[key] = self.turns.prompt_ids(prompt, tools)
                prompts.append(prompt)
                episodes.append(_Episode(list(rendered[key]), tools, {tool_name(t): t for t in tools}))
        return prompts, episodes, envs

    def _go_on(self, active: List[int]) -> bool:
        return self.lockstep_any(bool(active)) if self.lockstep_any is not None else bool(active)

    def produce(self, rows, indices, settings: SamplingSettings, group_size: int, *, first_group_id: int = 0
                ) -> Rollout:
        G, budget = group_size, settings.max_tokens
        prompts, episodes, envs = self._start(rows, G)
        stops = tuple(settings.stop_token_ids) + tuple(t for t in self.turns.stop_token_ids
                                                       if t not in settings.stop_token_ids)
        with_logps = with_versions = True
        active, rounds = list(range(len(episodes))), 0
        while self._go_on(active):
            left = [budget - len(episodes[i].ids) for i in active]
            turn = dataclasses.replace(settings, max_tokens=max(left, default=1), stop_token_ids=stops)
            asked = [episodes[i].prompt_ids + episodes[i].ids for i in active] or [[self.tokenizer.eos_token_id]]
            gen = self.engine.generate(asked, turn)
            if len(gen.completion_ids) != len(asked):
                raise RuntimeError(f"engine {self.engine.name!r} returned {len(gen.completion_ids)} completions for "
                                   f"{len(asked)} prompts")
            with_logps = with_logps and gen.logprobs is not None
            with_versions = with_versions and gen.policy_versions is not None
            calling = []
            for k, i in enumerate(active):
                e = episodes[i]
                ids, reason = list(gen.completion_ids[k]), gen.finish_reasons[k]
                logps = None if gen.logprobs is None else list(gen.logprobs[k])
                versions = None if gen.policy_versions is None else list(gen.policy_versions[k])
                if len(ids) > left[k]:   # one call samples for every sample: each keeps what its budget allows
                    ids, reason = ids[:left[k]], "length"
                    logps = None if logps is None else logps[:left[k]]
                    versions = None if versions is None else versions[:left[k]]
                prefix = e.prompt_ids + e.ids
                e.add(ids, 1, logps, versions)
                e.turns, e.finish = e.turns + 1, reason
                message, calls = parse_turn(self.tokenizer, ids, prefix=prefix, tools=e.tools)
                e.messages.append(message)
                if calls and reason == "stop" and rounds < self.max_rounds and len(e.ids) < budget:
                    e.pending = calls
                    calling.append(i)
            active = self._run_tools([episodes[i] for i in calling], calling, budget)
            rounds += 1
        samples = [Sample(prompt_ids=e.prompt_ids, completion_ids=e.ids, sampled=e.sampled,
                          logprobs=e.logps if with_logps else None, finish_reason=e.finish, completion=e.messages,
                          policy_versions=e.versions if with_versions else None)
                   for e in episodes]
        columns = {k: [r[k] for r in rows for _ in range(G)] for k in rows[0] if k != "prompt"}
        if envs is not None:
            columns["environments"] = envs     # TRL's keyword for reward functions
        stats = {"tool_calls": [float(e.calls) for e in episodes], "tool_failures": [float(e.failures) for e in episodes],
                 "turns": [float(e.turns) for e in episodes], "tool_seconds": [e.seconds for e in episodes]}
        return collate(samples, prompts=prompts, dataset_index=[i for i in indices for _ in range(G)],
                       columns=columns, group_size=G, pad_token_id=self.tokenizer.pad_token_id, device=self.device,
                       first_group_id=first_group_id, sample_stats=stats)

    def _run_tools(self, episodes: List[_Episode], which: List[int], budget: int) -> List[int]:
        """Run the pending calls of `episodes` at once and append their messages; -> the samples
        that go on to another turn."""
        jobs = [ToolJob(c.name, None if c.error else e.table.get(c.name), c.arguments, c.error)
                for e in episodes for c in e.pending]
        results = iter(self.runner.run(jobs))
        going = []
        for i, e in zip(which, episodes):
            messages = []
            for c in e.pending:
                r = next(results)
                e.calls, e.failures, e.seconds = e.calls + 1, e.failures + int(r.failed), e.seconds + r.seconds
                messages.append({"role": "tool", "name": c.name, "content": tool_content(r.content)})
            e.pending = []
            suffix = self.turns.tool_suffix(messages)
            if len(e.ids) + len(suffix) >= budget:   # no room for the results and a next turn: end here (TRL)
                continue
            e.add(suffix, 0, None)
            e.messages.extend(messages)
            going.append(i)
        return going
