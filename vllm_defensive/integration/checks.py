"""Fail closed at start-up: configurations the plugin cannot serve correctly stop `vllm serve`
(and `LLM(...)`) with a message that says what to change.

Runs where the VllmConfig is built (`EngineArgs.create_engine_config`, API-server / offline
process). The model's KV-cache layout (one full-attention group) is checked again in the engine
core, where it is known (`scheduler.SchedulerEviction`).
"""

from __future__ import annotations

import os

from vllm.logger import init_logger

from . import compat
from .config import enabled, server_config

logger = init_logger(__name__)


def problems(vllm_config) -> list[str]:
    out = []
    mc, pc, cc = vllm_config.model_config, vllm_config.parallel_config, vllm_config.cache_config
    if vllm_config.speculative_config is not None:
        out.append("speculative decoding (--speculative-config): drafts write KV beyond the kept "
                   "tokens; remove --speculative-config")
    if vllm_config.kv_transfer_config is not None:
        out.append("KV connectors (--kv-transfer-config): they move whole blocks by position; "
                   "remove --kv-transfer-config")
    if pc.pipeline_parallel_size > 1:
        out.append("pipeline parallelism (--pipeline-parallel-size > 1): use tensor parallelism")
    if pc.decode_context_parallel_size > 1 or pc.prefill_context_parallel_size > 1:
        out.append("context parallelism (--decode/prefill-context-parallel-size > 1)")
    if getattr(pc, "enable_dbo", False):
        out.append("dual-batch overlap (--enable-dbo)")
    if mc is not None:
        if mc.runner_type != "generate":
            out.append(f"runner '{mc.runner_type}': only generative models are supported")
        if mc.use_mla:
            out.append("MLA attention (DeepSeek-style latent KV): not supported")
        if mc.is_hybrid or mc.has_inner_state or mc.is_attention_free:
            out.append("hybrid / state-space models: not supported, serve a full-attention model")
        if mc.is_encoder_decoder:
            out.append("encoder-decoder models: not supported")
        if mc.is_multimodal_model:
            out.append("multimodal models: not supported")
        if getattr(mc, "uses_mrope", False):
            out.append("M-RoPE models: not supported")
    if cc.cache_dtype not in ("auto", None):
        out.append(f"quantized KV cache (--kv-cache-dtype {cc.cache_dtype}): use --kv-cache-dtype auto")
    if getattr(cc, "kv_sharing_fast_prefill", False):
        out.append("--kv-sharing-fast-prefill")
    if os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "").strip().lower() in ("1", "true"):
        out.append("VLLM_USE_V2_MODEL_RUNNER=1: the plugin patches the V1 model runner; unset it")
    return out


def check(vllm_config) -> None:
    found = problems(vllm_config)
    if found:
        raise compat.UnsupportedVllmError(
            "--kv-eviction cannot be used with: " + "; ".join(found)
            + ". Change these settings or serve without --kv-eviction.")


def install() -> None:
    VllmConfig = compat.VLLM_CONFIG.resolve()

    def create_engine_config(orig):
        def wrapper(self, *args, **kwargs):
            server_config(self.additional_config)  # bad additional_config fails before anything loads
            config = orig(self, *args, **kwargs)
            if server_config(config.additional_config) is not None:
                check(config)
                # Cascade attention reads shared-prefix blocks by logical position.
                config.model_config.disable_cascade_attn = True
            from . import frontend

            frontend.set_server(config)
            return config

        return wrapper

    def use_v2_model_runner(orig):
        def getter(self):
            # One runner is patched (V1): pin it whenever eviction is configured. MRV2 is the
            # default for Llama-family models on GPU in 0.24.
            if enabled(getattr(self, "additional_config", None)):
                return False
            return orig.fget(self)

        return property(getter)

    compat.patch_method(compat.ENGINE_ARGS_CREATE_CONFIG, create_engine_config)
    compat.patch(VllmConfig, "use_v2_model_runner", use_v2_model_runner)
