"""Rollouts: from prompt rows to samples.

    engine.py          RolloutEngine (token ids in; ids, log-probs, finish reasons out), SamplingSettings,
                       HFEngine (transformers generate), HFCopyEngine (on a copy, beside the trainer)
    vllm_common.py     building vLLM and one generate call; vllm_colocate.py / vllm_client.py the vLLM
                       engines; vllm_server.py the server (`grpo-fast vllm-serve`); vllm_loop.py one
                       thread driving vLLM for callers in any thread (batching, updates between steps)
    registry.py        engines by name (the config's `engine`)
    template.py        prompt templating and tokenisation
    producer.py        Producer: prompt rows -> samples (the group expansion, the turns)
    turns.py           TurnSpec: the trainer's tools / environment_factory / rollout_func -> the producer
    multi_turn.py      MultiTurnProducer (tool calls turn by turn); chat_turns.py the template's turns;
                       tool_calls.py schemas and parsing; tool_runner.py running calls; environments.py
    custom_rollout.py  RolloutFuncProducer (TRL's rollout_func)
    data.py            Rollout, the rollout data model (one step's samples), and its collation

Nothing here knows about rewards, advantages or losses.
"""
from .data import Rollout, Sample, collate, concat_rollouts
from .engine import Generation, HFCopyEngine, HFEngine, RolloutEngine, SamplingSettings
from .chat_turns import TemplateError, TurnTemplate
from .custom_rollout import RolloutFuncProducer
from .environments import Environments
from .multi_turn import MultiTurnProducer
from .producer import Producer, SingleTurnProducer
from .registry import ENGINES, EngineSpec, build_engine, engine_name, register_engine
from .template import PromptTemplate, is_conversational
from .tool_calls import ToolCall, parse_turn, tool_schemas
from .tool_runner import ToolRunner
from .turns import TurnSpec
from .vllm_client import VLLMServerEngine, VLLMServerError
from .vllm_colocate import VLLMColocateEngine
from .vllm_common import VLLMOptions

__all__ = ["ENGINES", "EngineSpec", "Environments", "Generation", "HFCopyEngine", "HFEngine", "MultiTurnProducer", "Producer",
           "PromptTemplate", "Rollout", "RolloutEngine", "RolloutFuncProducer", "Sample", "SamplingSettings",
           "SingleTurnProducer", "TemplateError", "ToolCall", "ToolRunner", "TurnSpec", "TurnTemplate",
           "VLLMColocateEngine", "VLLMOptions", "VLLMServerEngine", "VLLMServerError", "build_engine", "collate",
           "concat_rollouts", "engine_name", "is_conversational", "parse_turn", "register_engine", "tool_schemas"]
