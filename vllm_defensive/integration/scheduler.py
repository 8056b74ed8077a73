"""Engine-core side: decide, per request, when and how its KV cache is compacted.

Protocol (one request):
  add_request     resolve the request's config; skip it right away if there is nothing to do
  prefix lookup   cap cache hits below the observation window (its queries must be computed)
  schedule(N)     chunks that touch the window are at least 2 tokens (never a decode-shaped
                  batch, which a FULL CUDA graph would replay without our query hook), and
                  prefill stops at the prompt's end
  schedule(N)     the step that computes the prompt's last token *arms and commits*: fresh
                  blocks for the kept tokens, the request's block list swapped to them, its
                  offset set, and its old blocks freed untouched (hashes intact, so prefix
                  caching stays correct). The plan rides on SchedulerOutput to the workers,
                  which fill the fresh blocks right after step N's forward.
  update(N)       the EvictionRecord (with the worker's timings) rides to the front end on the
                  request's EngineCoreOutput
  preemption      blocks and offset go; the request re-prefills its prompt, is compacted again,
                  then recomputes its earlier outputs against the compacted cache (as a
                  prefill chunk), which is how they were computed the first time

Freeing the old blocks while step N (which reads them) may still run is the same ordering
argument vLLM itself relies on: anything scheduled later runs after step N on the same stream.
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm.logger import init_logger
from vllm.utils.math_utils import cdiv
from vllm.v1.kv_cache_interface import FullAttentionSpec

from ..policy import EvictionConfig
from ..stats import EvictionRecord
from . import compat
from .config import ADDITIONAL_CONFIG_KEY, ServerConfig, resolve, server_config
from .kv_manager import OffsetFullAttentionManager
from .plan import STATS_ATTR, STEP_ATTR, CompactionPlan, StepPlan

logger = init_logger(__name__)

RECORD_KEY = "vllm_defensive"  # our key inside EngineCoreOutput.kv_transfer_params


@dataclass
class RequestState:
    config: EvictionConfig
    prompt_len: int
    context_len: int
    status: str  # "pending" | "compacted" | "skipped"
    record: EvictionRecord | None = None

    @property
    def window(self) -> tuple[int, int]:
        return self.context_len - self.config.window, self.context_len


def check_kv_cache_groups(kv_cache_config):
    """One KV-cache group of plain full attention, or UnsupportedVllmError."""
    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1 or type(groups[0].kv_cache_spec) is not FullAttentionSpec:
        kinds = ", ".join(type(g.kv_cache_spec).__name__ for g in groups) or "none"
        raise compat.UnsupportedVllmError(
            f"--kv-eviction needs a model whose layers all use plain full attention (one KV-cache "
            f"group of FullAttentionSpec); this model has: {kinds}. Sliding-window, hybrid, MLA "
            "and cross-attention models are not supported: serve without --kv-eviction."
        )
    return groups


class SchedulerEviction:
    """Per-scheduler state, attached as `scheduler._kvd` when eviction is configured."""

    def __init__(self, scheduler, server: ServerConfig):
        self.scheduler = scheduler
        self.server = server
        groups = check_kv_cache_groups(scheduler.kv_cache_config)
        spec = groups[0].kv_cache_spec
        coordinator = scheduler.kv_cache_manager.coordinator
        self.manager = OffsetFullAttentionManager.install(coordinator.single_type_managers[0])
        self.block_pool = scheduler.kv_cache_manager.block_pool
        self.block_size = self.manager.block_size
        # One block of one layer holds K and V of block_size tokens for every KV head.
        self.bytes_per_block = spec.page_size_bytes * len(groups[0].layer_names)
        self.states: dict[str, RequestState] = {}
        self.undelivered: dict[str, EvictionRecord] = {}
        scheduler.need_mamba_block_aligned_split = True  # routes every chunk through shape_chunk
        self._wrap_prefix_lookup(scheduler.kv_cache_manager)
        logger.info("KV eviction on: %s", server.model_dump(exclude_defaults=True) or "defaults")

    # -- requests -----------------------------------------------------------------------------
    def add_request(self, request) -> None:
        rid = request.request_id
        params = request.sampling_params
        if params is None or rid in self.states:
            return
        prompt_len = request.num_prompt_tokens
        try:
            cfg = resolve(self.server, params.extra_args)
        except ValueError as e:  # the front end validates first; this is a direct engine user
            logger.warning("request %s: %s; KV eviction skipped", rid, e)
            cfg = self.server.defaults().model_copy(update={"method": "none"})
        ctx = prompt_len - cfg.protect_suffix
        state = RequestState(cfg, prompt_len, ctx, "pending")
        self.states[rid] = state
        reason = None
        if cfg.method == "none":
            reason = "disabled"
        elif cfg.protect_suffix >= prompt_len or prompt_len < cfg.min_prompt or cfg.window >= ctx:
            reason = "prompt_too_short"
        elif cfg.keep_per_head(ctx) >= ctx and not self.server.force_compaction:
            reason = "budget_full"
        if reason is not None:
            self._skip(rid, state, reason)

    def _record(self, rid: str, state: RequestState, **fields) -> EvictionRecord:
        cfg = state.config
        rec = EvictionRecord(request_id=rid, method=cfg.method, budget=cfg.budget,
                             budget_tokens=cfg.budget_tokens, prompt_tokens=state.prompt_len, **fields)
        state.record = rec
        self.undelivered[rid] = rec
        return rec

    def _skip(self, rid: str, state: RequestState, reason: str) -> None:
        state.status = "skipped"
        self._record(rid, state, compacted=False, skip_reason=reason, tokens_kept=state.prompt_len)

    def on_preempt(self, request) -> None:
        state = self.states.get(request.request_id)
        if state is not None and state.status == "compacted":
            state.status = "pending"  # recomputed from scratch, then compacted again

    def on_free(self, request) -> None:
        state = self.states.pop(request.request_id, None)
        if state is not None and state.status == "pending":
            logger.debug("request %s ended before its KV cache was scored", request.request_id)

    # -- prefix cache ---------------------------------------------------------------------------
    def _wrap_prefix_lookup(self, kv_cache_manager) -> None:
        original = kv_cache_manager.get_computed_blocks
        block_size = self.block_size

        def get_computed_blocks(request):
            blocks, num_hit = original(request)
            state = self.states.get(request.request_id)
            if state is None or state.status != "pending" or num_hit == 0:
                return blocks, num_hit
            cap = (state.window[0] // block_size) * block_size
            if num_hit <= cap:
                return blocks, num_hit
            # The window's queries are needed for scoring: recompute it.
            keep = cap // block_size
            capped = kv_cache_manager.create_kv_cache_blocks(tuple(list(b[:keep]) for b in blocks.blocks))
            return capped, cap

        kv_cache_manager.get_computed_blocks = get_computed_blocks

    # -- chunk shaping --------------------------------------------------------------------------
    def shape_chunk(self, request, num_new_tokens: int, num_computed: int) -> int:
        state = self.states.get(request.request_id)
        if state is None or state.status != "pending" or num_new_tokens <= 0:
            return num_new_tokens
        # Stop at the prompt's end: a request recomputed after preemption is compacted there,
        # and its earlier outputs are then recomputed against the compacted cache, exactly as
        # they were first computed.
        limit = state.prompt_len
        n = min(num_new_tokens, limit - num_computed) if num_computed < limit else num_new_tokens
        if num_computed + n < limit and limit - (num_computed + n) == 1:
            n -= 1  # never leave a 1-token last prompt chunk
        ws, we = state.window
        if n == 1 and num_computed < we and num_computed + 1 > ws:
            n = 0  # a 1-token chunk in the window would look like a decode: wait a step
        return max(n, 0)

    # -- schedule -------------------------------------------------------------------------------
    def after_schedule(self, out) -> None:
        plan = StepPlan()
        sched = self.scheduler
        for rid, n in out.num_scheduled_tokens.items():
            state = self.states.get(rid)
            if state is None or state.status != "pending":
                continue
            request = sched.requests[rid]
            end = request.num_computed_tokens  # already advanced by _update_after_schedule
            start = end - n
            ws, we = state.window
            if start < we and end > ws:
                plan.windows[rid] = (ws, we)
            if end >= state.prompt_len:
                self._arm(rid, request, state, end, plan)
        if plan.windows or plan.compactions:
            setattr(out, STEP_ATTR, plan)

    def _arm(self, rid: str, request, state: RequestState, end: int, plan: StepPlan) -> None:
        cfg, ctx = state.config, state.context_len
        keep = min(cfg.keep_per_head(ctx), ctx)
        tail = end - ctx  # the protected suffix (shape_chunk stops every request at its prompt end)
        need = cdiv(keep + tail, self.block_size)
        if self.block_pool.get_num_free_blocks() < need:
            self._skip(rid, state, "no_free_blocks")
            return
        dst = self.block_pool.get_new_blocks(need)
        old = self.manager.swap_blocks(rid, dst, ctx - keep)
        self.block_pool.free_blocks(reversed(old))
        state.status = "compacted"
        plan.compactions[rid] = CompactionPlan(
            request_id=rid, context_len=ctx, keep=keep, tail=tail,
            dst_block_ids=[b.block_id for b in dst], config=cfg.model_dump(),
            record_keep_sets=self.server.record_keep_sets)
        freed = len(old) - need
        self._record(rid, state, compacted=True,
                     tokens_kept=keep + (state.prompt_len - ctx), tokens_evicted=ctx - keep,
                     blocks_before=len(old), blocks_after=need, blocks_freed=freed,
                     bytes_freed=max(freed, 0) * self.bytes_per_block)

    # -- outputs --------------------------------------------------------------------------------
    def after_update(self, model_runner_output, engine_core_outputs) -> None:
        stats = getattr(model_runner_output, STATS_ATTR, None)
        if stats:
            for rid, st in stats.items():
                rec = self.undelivered.get(rid)
                if rec is None:
                    continue
                st.resolve()
                rec.score_ms, rec.compact_ms = round(st.score_ms, 3), round(st.compact_ms, 3)
                if st.error:
                    # The commit is optimistic: the worker fell back to sinks + recent tokens.
                    rec.skip_reason = "error"
                    logger.error("request %s: KV scoring failed (%s); kept sinks and recent tokens",
                                 rid, st.error)
        if self.undelivered:
            for eco in engine_core_outputs.values():
                for out in eco.outputs:
                    rec = self.undelivered.pop(out.request_id, None)
                    if rec is not None:
                        params = dict(out.kv_transfer_params or {})
                        params[RECORD_KEY] = rec.to_dict()
                        out.kv_transfer_params = params
            live = self.scheduler.requests
            for rid in [r for r in self.undelivered if r not in live]:
                del self.undelivered[rid]


# --- patches on vLLM's Scheduler --------------------------------------------------------------


def install() -> None:
    Scheduler = compat.SCHEDULER.resolve()

    def init(orig):
        def __init__(self, vllm_config, *args, **kwargs):
            orig(self, vllm_config, *args, **kwargs)
            server = server_config(vllm_config.additional_config)
            self._kvd = SchedulerEviction(self, server) if server is not None else None

        return __init__

    def add_request(orig):
        def wrapper(self, request):
            orig(self, request)
            if self._kvd is not None:
                self._kvd.add_request(request)

        return wrapper

    def schedule(orig):
        def wrapper(self, *args, **kwargs):
            out = orig(self, *args, **kwargs)
            if self._kvd is not None:
                self._kvd.after_schedule(out)
            return out

        return wrapper

    def update_from_output(orig):
        def wrapper(self, scheduler_output, model_runner_output):
            outs = orig(self, scheduler_output, model_runner_output)
            if self._kvd is not None:
                self._kvd.after_update(model_runner_output, outs)
            return outs

        return wrapper

    def preempt(orig):
        def wrapper(self, request, timestamp):
            orig(self, request, timestamp)
            if self._kvd is not None:
                self._kvd.on_preempt(request)

        return wrapper

    def free_request(orig):
        def wrapper(self, request, delay_free_blocks=False):
            result = orig(self, request, delay_free_blocks)
            if self._kvd is not None:
                self._kvd.on_free(request)
            return result

        return wrapper

    def chunk_hook(orig):
        def wrapper(self, request, num_new_tokens, num_new_local_computed_tokens=0,
                    num_external_computed_tokens=0, num_uncached_common_prefix_tokens=0):
            if self.has_mamba_layers and self.cache_config.mamba_cache_mode == "align":
                num_new_tokens = orig(self, request, num_new_tokens, num_new_local_computed_tokens,
                                      num_external_computed_tokens, num_uncached_common_prefix_tokens)
            if self._kvd is not None:
                computed = request.num_computed_tokens + num_new_local_computed_tokens \
                    + num_external_computed_tokens
                num_new_tokens = self._kvd.shape_chunk(request, num_new_tokens, computed)
            return num_new_tokens

        return wrapper

    Scheduler._kvd = None  # class default: schedulers built before install() stay stock
    compat.patch_method(compat.SCHEDULER_INIT, init)
    compat.patch_method(compat.SCHEDULER_ADD_REQUEST, add_request)
    compat.patch_method(compat.SCHEDULER_SCHEDULE, schedule)
    compat.patch_method(compat.SCHEDULER_UPDATE_FROM_OUTPUT, update_from_output)
    compat.patch_method(compat.SCHEDULER_PREEMPT, preempt)
    compat.patch_method(compat.SCHEDULER_FREE_REQUEST, free_request)
    compat.patch_method(compat.SCHEDULER_CHUNK_HOOK, chunk_hook)


__all__ = ["install", "SchedulerEviction", "RECORD_KEY", "ADDITIONAL_CONFIG_KEY"]
