"""The continuous-batching engine: one worker thread owning the GPU, slot KV cache, compiled CUDA-graph decode steps.

Modules: options (BatchOptions), requests (request state, per-step outputs, reader streams), scheduler (admission
and prefill policy, CPU only), runner (model forwards), kv (slots, retained prefixes), graphs (compile + CUDA
graphs), sampler (next tokens), core (the step loop), engine (BatchEngine: the thread and the public API).
"""

from qwen3vl_webui.engine.batch.core import EngineSnapshot
from qwen3vl_webui.engine.batch.engine import BatchEngine
from qwen3vl_webui.engine.batch.options import BatchOptions
from qwen3vl_webui.engine.batch.requests import EngineClosed, EngineOutputs, RequestOutput

__all__ = ["BatchEngine", "BatchOptions", "EngineClosed", "EngineOutputs", "EngineSnapshot", "RequestOutput"]
