"""Rollouts: from prompt rows to samples.

    engine.py          RolloutEngine (token ids in; ids, log-probs, finish reasons out), SamplingSettings,
                       HFEngine (transformers generate), HFCopyEngine (on a copy, beside the trainer)
    vllm_common.py     building vLLM and one generate call; vllm_colocate.py / vllm_client.py the vLLM
                       engines; vllm_server.py the server (`grpo-fast vllm-serve`); vllm_loop.py one
                       thread driving vLLM for callers in any thread (batching, updates between steps)
    registry.py        engines by name (the config's `engine`)
    template.py        prompt templating and tokenisation
    producer.py        Producer: prompt rows -> samples (the group expansion, the turns)
    data.py            Rollout, the rollout data model (one step's samples), and its collation

Nothing here knows about rewards, advantages or losses.
"""
from .data import Rollout, Sample, collate, concat_rollouts
from .engine import Generation, HFCopyEngine, HFEngine, RolloutEngine, SamplingSettings
from .producer import Producer, SingleTurnProducer
from .registry import ENGINES, EngineSpec, build_engine, engine_name, register_engine
from .template import PromptTemplate, is_conversational
from .vllm_client import VLLMServerEngine, VLLMServerError
from .vllm_colocate import VLLMColocateEngine
from .vllm_common import VLLMOptions

__all__ = ["ENGINES", "EngineSpec", "Generation", "HFCopyEngine", "HFEngine", "Producer", "PromptTemplate", "Rollout", "RolloutEngine",
           "Sample", "SamplingSettings", "SingleTurnProducer", "VLLMColocateEngine", "VLLMOptions",
           "VLLMServerEngine", "VLLMServerError", "build_engine", "collate", "concat_rollouts", "engine_name",
           "is_conversational", "register_engine"]
