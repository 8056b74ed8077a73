"""Front-end process (API server, or the offline `LLM` process): validate requests, receive the
engine core's EvictionRecords and show them to users.

* Per-request values (`vllm_xargs`: kv_eviction, kv_budget, kv_budget_tokens, kv_protect_suffix,
  kv_uniform_floor, kv_uniform_norm, kv_uniform_risk_first)
  are checked while the request's SamplingParams are built and again in
  `InputProcessor.process_inputs` (which knows the prompt length). Errors are
  `VLLMValidationError`s naming the field: an HTTP 400, the server keeps serving.
* Records arrive inside `EngineCoreOutput.kv_transfer_params` (the one free-form per-request
  field that crosses the engine-core boundary; KV connectors, its owners, are refused at start).
  `OutputProcessor.process_outputs` takes them out before vLLM sees them, calls
  `observability.on_record` (once when the request was compacted or skipped, once when it
  finishes) and hangs the dict on every later `RequestOutput` as `.kv_eviction`.
* The OpenAI completion and chat endpoints copy it into a top-level `kv_eviction` field of the
  response (streaming: on the chunk that carries the choice's finish_reason). The OpenAI models
  allow extra fields, so the schema is otherwise untouched.
"""

from __future__ import annotations

import json

from vllm.exceptions import VLLMValidationError
from vllm.logger import init_logger

from .. import observability
from ..stats import EvictionRecord
from . import compat
from .config import ServerConfig, check_prompt_fields, request_overrides, resolve, server_config
from .scheduler import RECORD_KEY

logger = init_logger(__name__)

FIELD = "kv_eviction"  # RequestOutput attribute and response field

_UNKNOWN = object()
_server: ServerConfig | None | object = _UNKNOWN  # set where this process built the VllmConfig
_model_name: str = ""


def set_server(vllm_config) -> None:
    """Remember this process's eviction settings (set where the VllmConfig is built)."""
    global _server, _model_name
    _server = server_config(vllm_config.additional_config)
    mc = vllm_config.model_config
    _model_name = str(getattr(mc, "served_model_name", None) or getattr(mc, "model", ""))
    if _server is not None:
        # create the series at zero now, so dashboards read 0 (not "no data") before traffic
        try:
            from ..observability.metrics import install_metrics

            install_metrics(_model_name, [_server.defaults().method])
        except Exception:  # metrics must never stop the server
            logger.exception("installing the eviction metrics failed")


# --- request validation -----------------------------------------------------------------------


def _invalid(err: ValueError) -> VLLMValidationError:
    msg = str(err)
    field = msg.split(":", 1)[0] if ":" in msg else None
    return VLLMValidationError(msg, parameter=field)


def validate(server: ServerConfig | None, extra_args: dict | None, prompt_len: int | None = None):
    """Raise VLLMValidationError (HTTP 400) for bad per-request eviction values."""
    try:
        overrides = request_overrides(extra_args)
        if not overrides:
            return
        if server is None:
            key = next(iter(overrides))
            raise ValueError(f"{key}: KV eviction is not enabled on this server "
                             "(start it with --kv-eviction METHOD)")
        cfg = resolve(server, extra_args)
        if prompt_len is not None:
            check_prompt_fields(cfg, prompt_len, extra_args)
    except VLLMValidationError:
        raise
    except ValueError as e:
        raise _invalid(e) from None


def _prompt_len(request) -> int | None:
    ids = getattr(request, "prompt_token_ids", None)
    if ids is not None:
        return len(ids)
    embeds = getattr(request, "prompt_embeds", None)
    return None if embeds is None else len(embeds)


# --- records ------------------------------------------------------------------------------------


def user_view(record: dict) -> dict:
    """The record as responses show it: skipped requests lead with {"skipped": reason}."""
    if not record.get("compacted") and record.get("skip_reason"):
        return {"skipped": record["skip_reason"], **record}
    return dict(record)


def _deliver(record: dict, finished: bool) -> None:
    try:
        observability.on_record(EvictionRecord.from_dict(record), _model_name, finished)
    except Exception:
        logger.exception("delivering an eviction record failed")


def take_records(processor, engine_core_outputs) -> dict:
    """Pop our records out of kv_transfer_params; returns {request_id: state} of tracked requests."""
    tracked = {}
    states = processor.request_states
    for out in engine_core_outputs:
        params = out.kv_transfer_params
        state = states.get(out.request_id)
        if params and RECORD_KEY in params:
            rest = {k: v for k, v in params.items() if k != RECORD_KEY}
            out.kv_transfer_params = rest or None
            if state is None:
                continue
            record = dict(params[RECORD_KEY])
            record["request_id"] = state.external_req_id
            first = getattr(state, "_kvd_record", None) is None
            state._kvd_record = record
            if first:
                _deliver(record, finished=False)
        if state is not None and getattr(state, "_kvd_record", None) is not None:
            tracked[out.request_id] = state
    return tracked


def finish_records(processor, tracked: dict) -> None:
    for rid, state in tracked.items():
        if rid not in processor.request_states and not getattr(state, "_kvd_final", False):
            state._kvd_final = True
            _deliver(state._kvd_record, finished=True)


# --- streaming helpers --------------------------------------------------------------------------


# Only a chunk that finishes a choice carries a string finish_reason; every other chunk says
# "finish_reason":null. Checked on the raw text so that the per-token chunks are not parsed (this
# runs in the API server's event loop for every streamed token). Text inside a choice is
# JSON-escaped, so it cannot contain these unescaped quotes.
_FINISHED = ('"finish_reason":"', '"finish_reason": "')


def _tag_chunk(chunk: str, records: dict[int, dict], per_prompt: int | None) -> str:
    """Add kv_eviction to an SSE chunk that finishes a choice (choice index // per_prompt is the
    prompt; None: a single prompt)."""
    if not records or not chunk.startswith("data: {") or not any(m in chunk for m in _FINISHED):
        return chunk
    try:
        data = json.loads(chunk[len("data: "):])
    except ValueError:
        return chunk
    finished = [c for c in data.get("choices") or [] if c.get("finish_reason")]
    if not finished:
        return chunk
    index = int(finished[0].get("index", 0))
    record = records.get(0 if per_prompt is None else index // max(per_prompt, 1))
    if record is None:
        return chunk
    data[FIELD] = user_view(record)
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


async def _tap(results, records: dict[int, dict], indexed: bool):
    async for item in results:
        idx, res = item if indexed else (0, item)
        record = getattr(res, FIELD, None)
        if record is not None:
            records[idx] = record
        yield item


# --- patches ------------------------------------------------------------------------------------


def install() -> None:
    def to_sampling_params(orig):
        def wrapper(self, *args, **kwargs):
            params = orig(self, *args, **kwargs)
            # Early (HTTP 400 even for streams); a process that did not build the config (extra
            # API servers) leaves it to process_inputs.
            if _server is not _UNKNOWN:
                validate(_server, params.extra_args)
            return params

        return wrapper

    def process_inputs(orig):
        def wrapper(self, request_id, prompt, params, *args, **kwargs):
            server = getattr(self, "_kvd_server", False)
            if server is False:
                server = self._kvd_server = server_config(self.vllm_config.additional_config)
            extra = getattr(params, "extra_args", None)
            validate(server, extra)
            request = orig(self, request_id, prompt, params, *args, **kwargs)
            if server is not None and request_overrides(extra):
                validate(server, extra, _prompt_len(request))
            return request

        return wrapper

    def process_outputs(orig):
        def wrapper(self, engine_core_outputs, *args, **kwargs):
            tracked = take_records(self, engine_core_outputs)
            result = orig(self, engine_core_outputs, *args, **kwargs)
            if tracked:
                finish_records(self, tracked)
            return result

        return wrapper

    def abort_requests(orig):
        def wrapper(self, request_ids, *args, **kwargs):
            tracked = {rid: s for rid, s in self.request_states.items()
                       if getattr(s, "_kvd_record", None) is not None}
            result = orig(self, request_ids, *args, **kwargs)
            if tracked:
                finish_records(self, tracked)
            return result

        return wrapper

    def make_request_output(orig):
        def wrapper(self, *args, **kwargs):
            out = orig(self, *args, **kwargs)
            record = getattr(self, "_kvd_record", None)
            if out is not None and record is not None:
                setattr(out, FIELD, user_view(record))
            return out

        return wrapper

    def request_output_add(orig):
        def wrapper(self, next_output, *args, **kwargs):
            orig(self, next_output, *args, **kwargs)
            record = getattr(next_output, FIELD, None)
            if record is not None:
                setattr(self, FIELD, record)

        return wrapper

    def completion_response(orig):
        def wrapper(self, final_res_batch, *args, **kwargs):
            response = orig(self, final_res_batch, *args, **kwargs)
            records = [getattr(r, FIELD, None) for r in final_res_batch]
            if any(r is not None for r in records):
                setattr(response, FIELD, records[0] if len(records) == 1 else records)
            return response

        return wrapper

    def completion_stream(orig):
        def wrapper(self, request, engine_inputs, result_generator, *args, **kwargs):
            records: dict[int, dict] = {}
            per_prompt = 1 if request.n is None else request.n

            async def gen():
                async for chunk in orig(self, request, engine_inputs, _tap(result_generator, records, True),
                                        *args, **kwargs):
                    yield _tag_chunk(chunk, records, per_prompt)

            return gen()

        return wrapper

    def chat_full(orig):
        async def wrapper(self, request, result_generator, *args, **kwargs):
            records: dict[int, dict] = {}
            response = await orig(self, request, _tap(result_generator, records, False), *args, **kwargs)
            if records and hasattr(response, "choices"):
                setattr(response, FIELD, records[0])
            return response

        return wrapper

    def chat_stream(orig):
        def wrapper(self, request, result_generator, *args, **kwargs):
            records: dict[int, dict] = {}

            async def gen():
                async for chunk in orig(self, request, _tap(result_generator, records, False), *args, **kwargs):
                    yield _tag_chunk(chunk, records, None)

            return gen()

        return wrapper

    compat.patch_method(compat.COMPLETION_TO_SAMPLING, to_sampling_params)
    compat.patch_method(compat.CHAT_TO_SAMPLING, to_sampling_params)
    compat.patch_method(compat.INPUT_PROCESSOR_PROCESS, process_inputs)
    compat.patch_method(compat.OUTPUT_PROCESSOR_PROCESS, process_outputs)
    compat.patch_method(compat.OUTPUT_PROCESSOR_ABORT, abort_requests)
    compat.patch_method(compat.REQUEST_STATE_MAKE_OUTPUT, make_request_output)
    compat.patch_method(compat.REQUEST_OUTPUT_ADD, request_output_add)
    compat.patch_method(compat.COMPLETION_TO_RESPONSE, completion_response)
    compat.patch_method(compat.COMPLETION_STREAM, completion_stream)
    compat.patch_method(compat.CHAT_FULL, chat_full)
    compat.patch_method(compat.CHAT_STREAM, chat_stream)


__all__ = ["install", "set_server", "validate", "user_view", "FIELD"]
