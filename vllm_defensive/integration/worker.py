"""Worker side: keep the window's queries, compact after the prefill, and run on physical slots.

Patches the V1 model runner (`vllm.v1.worker.gpu_model_runner.GPUModelRunner`; the CPU runner
subclasses it, and the plugin pins V1 on GPU too):

* every decoder attention layer's `impl.forward` is wrapped to copy the post-RoPE queries of the
  observation-window positions computed in this step into a per-request stash (chunked prefill
  may spread the window over several steps);
* after the forward of the step that completes a request's prefill, every layer's context keys
  and values are scored with the window queries, and the kept tokens plus the tail (protected
  suffix) are copied into the fresh blocks the scheduler chose; the request's block-table row is
  replaced by them. On GPU caches with the kernels, scoring reads the pages directly for all
  layers at once (`scoring.select_keep_paged`) and one launch copies every layer
  (`triton_kernels.compact_kv`); elsewhere (the CPU build) each layer is gathered, scored by
  the policy library (`scoring.select_keep`) and copied with plain indexing;
* from then on, `_prepare_inputs` keeps positions logical (RoPE) but recomputes the slot mapping
  from `position - offset` and subtracts the offset from the attention `seq_lens`.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from vllm.logger import init_logger

from ..policy import METHODS, EvictionConfig, LayerInputs
from . import compat, debug
from .config import server_config
from .layout import CpuLayout, GpuLayout, KVLayout
from .plan import STATS_ATTR, STEP_ATTR, CompactionPlan, WorkerStats
from .scoring import PagedRequest, choose_selector, fallback_keep, select_keep, select_keep_paged

logger = init_logger(__name__)

KVViews = tuple[list[torch.Tensor], list[torch.Tensor]]  # every layer's K and V page views


class WorkerEviction:
    def __init__(self, runner):
        self.runner = runner
        self.server = server_config(runner.vllm_config.additional_config)
        groups = runner.kv_cache_config.kv_cache_groups
        if len(groups) != 1:
            raise compat.UnsupportedVllmError("--kv-eviction needs one KV-cache group (plain full attention)")
        spec = groups[0].kv_cache_spec
        self.block_size = spec.block_size
        kernel = getattr(runner, "_kernel_block_sizes", [self.block_size])
        if list(kernel) != [self.block_size]:
            raise compat.UnsupportedVllmError(
                f"--kv-eviction needs the attention kernel block size to equal the KV-cache block size "
                f"(got {kernel} vs {self.block_size}); pass a --block-size the backend supports natively")
        ctx = runner.compilation_config.static_forward_context
        self.layer_names = list(groups[0].layer_names)
        self.layers = [ctx[name] for name in self.layer_names]
        first = self.layers[0]
        self.num_kv_heads = first.num_kv_heads
        self.num_heads = first.num_heads
        self.head_size = first.head_size
        self.dtype = runner.model_config.dtype
        self.device = runner.device
        self.layout = self._make_layout(first)
        for layer in self.layers:
            self.layout.check(layer.kv_cache)
            if layer.kv_sharing_target_layer_name is not None:
                raise compat.UnsupportedVllmError("--kv-eviction does not support KV-sharing layers")
        self._o_proj: list[torch.Tensor | None] | None = None
        self.offsets: dict[str, int] = {}
        self.stash: dict[str, torch.Tensor] = {}  # request -> [layers, Hq, W, d] window queries
        self.filled: dict[str, np.ndarray] = {}  # request -> [W] bool, which window rows arrived
        self.capture: list[tuple[str, slice, slice]] = []  # this step's (request, token rows, window slots)
        self.step_plan = None
        self.pending_stats: dict[str, WorkerStats] = {}
        self.scoring_path = choose_selector(self.device)
        # Straight from the pages (all layers per launch) where the kernels run on GPU pages; the
        # layers must share one softmax scale (they do in every decoder vLLM serves).
        self.paged = self.scoring_path == "triton" and isinstance(self.layout, GpuLayout) \
            and len({layer.impl.scale for layer in self.layers}) == 1
        if self.scoring_path == "triton":
            try:
                self._warm_up_kernels()
            except Exception:  # an optimisation only: never keep the engine from starting
                logger.exception("warming up the eviction kernels failed; they will compile on first use")
        self._install_query_hooks()

    def _make_layout(self, layer) -> KVLayout:
        backend = layer.attn_backend.get_name()
        if backend == "CPU_ATTN":
            return CpuLayout(self.block_size, self.num_kv_heads, self.head_size, layer.kv_cache.dtype,
                             layer.impl.isa)
        if layer.kv_cache.dim() == 5:
            return GpuLayout(self.block_size, self.num_kv_heads, self.head_size)
        raise compat.UnsupportedVllmError(f"--kv-eviction does not know the KV layout of backend {backend}")

    def _warm_up_kernels(self) -> None:
        """JIT-compile the scoring and compaction kernels at start-up for this model's shapes,
        dtype and cache layout, so the first requests do not pay seconds of Triton compilation
        inside an engine step (the kernels name the few prompt lengths that cover their compile
        variants). Nothing is being served yet: the pages read hold no request, and the warm-up
        copy writes every token onto itself."""
        from .. import triton_kernels

        t0 = time.perf_counter()
        weights = self.o_proj_weights()
        window = self.server.window
        with torch.inference_mode():
            for n in triton_kernels.warmup_lengths(self.num_kv_heads, window, self.device):
                if self.paged:
                    self._warm_up_paged(n, window, weights)
                    continue
                q = torch.randn(self.num_heads, window, self.head_size, dtype=self.dtype, device=self.device)
                k = torch.randn(self.num_kv_heads, n, self.head_size, dtype=self.dtype, device=self.device)
                inp = LayerInputs(q, k, k.clone(), weights[0], self.layers[0].impl.scale)
                for method in ("snapkv", "defensivekv"):
                    cfg = EvictionConfig(method=method, window=window, budget=0.5)
                    select_keep(cfg, [inp], n // 2, (1, self.num_kv_heads, n), self.device)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        logger.info("KV eviction kernels warmed up in %.1f s", time.perf_counter() - t0)

    def _warm_up_paged(self, n: int, window: int, weights) -> None:
        keys, values = self._kv_views()
        blocks = -(-n // self.block_size)
        if blocks >= keys[0].shape[0]:  # a cache this small never holds such a prompt
            return
        table = self._block_table(list(range(1, blocks + 1)))  # block 0 is vLLM's null block
        q = torch.randn(len(self.layers), self.num_heads, window, self.head_size, dtype=self.dtype,
                        device=self.device)
        req = PagedRequest(q, keys, values, table, n, weights, self.layers[0].impl.scale)
        for method in ("snapkv", "defensivekv"):
            select_keep_paged(EvictionConfig(method=method, window=window, budget=0.5), req, n // 2)
        same = torch.arange(n, device=self.device).expand(len(self.layers), self.num_kv_heads, n)
        from .. import triton_kernels

        triton_kernels.compact_kv(keys, values, same, table, table)

    # -- query capture --------------------------------------------------------------------------
    def _install_query_hooks(self) -> None:
        runner = self.runner
        for index, layer in enumerate(self.layers):
            impl = layer.impl
            if getattr(impl, "_kvd_hooked", False):
                continue
            original = impl.forward

            def forward(attn_layer, query, *args, _orig=original, _index=index, **kwargs):
                result = _orig(attn_layer, query, *args, **kwargs)
                ev = getattr(runner, "_kvd", None)
                if ev is not None and ev.capture:
                    ev.capture_queries(_index, query)
                return result

            impl.forward = forward
            impl._kvd_hooked = True

    def capture_queries(self, layer_index: int, query: torch.Tensor) -> None:
        # Contiguous rows into contiguous window slots: one strided copy per request and layer
        # (no index tensors: this runs inside every layer's forward, where small models are
        # bound by the host's time per launch).
        q = query.view(query.shape[0], self.num_heads, self.head_size)
        for rid, rows, slots in self.capture:
            self.stash[rid][layer_index, :, slots].copy_(q[rows].transpose(0, 1))

    # -- per step -------------------------------------------------------------------------------
    def forget(self, request_ids) -> None:
        for rid in request_ids:
            self.offsets.pop(rid, None)
            self.stash.pop(rid, None)
            self.filled.pop(rid, None)

    def before_update_states(self, so) -> None:
        self.capture, self.step_plan = [], None
        resumed = getattr(so.scheduled_cached_reqs, "resumed_req_ids", ()) or ()
        self.forget(set(so.finished_req_ids) | set(so.preempted_req_ids or ()) | set(resumed))
        for new in so.scheduled_new_reqs:  # a request id can come back (abort + resubmit)
            self.forget((new.req_id,))

    def after_prepare_inputs(self, so, num_scheduled_tokens: np.ndarray) -> None:
        runner = self.runner
        batch = runner.input_batch
        num_reqs = batch.num_reqs
        plan = getattr(so, STEP_ATTR, None)
        self.step_plan = plan
        if plan is not None and plan.windows:
            for rid, (ws, we) in plan.windows.items():
                row = batch.req_id_to_index.get(rid)
                if row is None:
                    continue
                nc = int(batch.num_computed_tokens_cpu[row])
                lo, hi = max(ws, nc), min(we, nc + int(num_scheduled_tokens[row]))
                if lo >= hi:
                    continue
                if rid not in self.stash:
                    self.stash[rid] = torch.zeros(len(self.layers), self.num_heads, we - ws, self.head_size,
                                                  dtype=self.dtype, device=self.device)
                    self.filled[rid] = np.zeros(we - ws, dtype=bool)
                start = int(runner.query_start_loc.np[row])
                self.filled[rid][lo - ws : hi - ws] = True
                self.capture.append((rid, slice(lo - nc + start, hi - nc + start), slice(lo - ws, hi - ws)))
        if not self.offsets:
            return
        offs = np.array([self.offsets.get(rid, 0) for rid in batch.req_ids[:num_reqs]], dtype=np.int64)
        if not offs.any():
            return
        total = so.total_num_scheduled_tokens
        off_cpu = torch.from_numpy(offs)
        off_dev = off_cpu.to(self.device, non_blocking=True)
        token_req = runner.req_indices.gpu[:total]
        physical = runner.positions[:total] - off_dev[token_req]
        batch.block_table.compute_slot_mapping(num_reqs, runner.query_start_loc.gpu[: num_reqs + 1], physical)
        runner.seq_lens[:num_reqs] -= off_dev.to(runner.seq_lens.dtype)
        runner.optimistic_seq_lens_cpu[:num_reqs] -= off_cpu.to(runner.optimistic_seq_lens_cpu.dtype)

    def after_execute(self) -> None:
        plan, self.step_plan, self.capture = self.step_plan, None, []
        if plan is None or not plan.compactions:
            return
        with torch.inference_mode():
            for rid, cp in plan.compactions.items():
                self._compact(rid, cp)

    # -- compaction -----------------------------------------------------------------------------
    def o_proj_weights(self) -> list[torch.Tensor | None]:
        """W_o [D, Hq*d] per layer for the value-norm weighting. vLLM's CPU path repacks linear
        weights and drops `.weight`, so we read it back by pushing the identity through the
        layer's own (non-reducing) GEMM."""
        if self._o_proj is None:
            model = self.runner.get_model()
            width = self.num_heads * self.head_size
            out = []
            for name in self.layer_names:
                parent = name.rpartition(".")[0]
                try:
                    o_proj = model.get_submodule(parent).o_proj
                except AttributeError:
                    out.append(None)
                    continue
                w = getattr(o_proj, "weight", None)
                if isinstance(w, torch.Tensor) and w.dim() == 2 and w.shape[1] == width \
                        and w.dtype in (torch.float32, torch.bfloat16, torch.float16):
                    out.append(w.detach())
                    continue
                with torch.inference_mode():
                    eye = torch.eye(width, dtype=self.dtype, device=self.device)
                    out.append(o_proj.quant_method.apply(o_proj, eye).t().contiguous())
            if any(w is None for w in out):
                logger.warning("o_proj not found for some layers: value-norm weighting uses 1 there")
            self._o_proj = out
        return self._o_proj

    def _slots(self, block_ids: list[int], start: int, end: int) -> torch.Tensor:
        pos = torch.arange(start, end, device=self.device)
        blocks = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        return blocks[pos // self.block_size] * self.block_size + pos % self.block_size

    def _compact(self, rid: str, cp: CompactionPlan) -> None:
        runner = self.runner
        state = runner.requests.get(rid)
        if state is None:
            return
        cfg = EvictionConfig(**cp.config)
        ctx, keep, tail, heads = cp.context_len, cp.keep, cp.tail, self.num_kv_heads
        src_blocks = list(state.block_ids[0])
        # GPU pages: one device block table serves scoring and the copy; elsewhere, slot lists
        src_table = self._block_table(src_blocks) if self.paged else None
        kv_views = self._kv_views() if self.paged else None
        ctx_slots = None if self.paged else self._slots(src_blocks, 0, ctx)
        stats = WorkerStats()
        clock = _StepClock(self.device)
        try:
            queries = self.stash.get(rid)
            if queries is None or not self.filled[rid].all():
                raise RuntimeError("observation-window queries were not all captured")
            if self.paged:
                keep_idx = self._score_paged(cfg, queries, kv_views, src_table, ctx, keep)
            else:
                keep_idx = self._score(cfg, queries, ctx_slots, keep)
        except Exception as e:  # blocks are already committed: fall back, never corrupt
            logger.exception("KV scoring failed for request %s", rid)
            stats.error = f"{type(e).__name__}: {e}"
            keep_idx = fallback_keep(cfg, ctx, heads, keep, self.device).expand(len(self.layers), heads, keep)
        clock.mark()
        if self.paged:
            self._copy_paged(keep_idx, kv_views, src_table, cp.dst_block_ids, ctx, tail)
        else:
            tail_rows = self._slots(src_blocks, ctx, ctx + tail).expand(heads, -1)
            dst_slots = self._slots(cp.dst_block_ids, 0, keep + tail).expand(heads, -1)
            for layer, idx in zip(self.layers, keep_idx):
                src = torch.cat([ctx_slots[idx], tail_rows], dim=1)
                k, v = self.layout.gather(layer.kv_cache, src)
                self.layout.scatter(layer.kv_cache, dst_slots, k, v)
        clock.mark()
        clock.into(stats)
        self.pending_stats[rid] = stats
        if cp.record_keep_sets:
            masks = []
            for idx in keep_idx:
                m = torch.zeros(heads, ctx + tail, dtype=torch.bool)
                m[:, ctx:] = True
                m.scatter_(1, idx.cpu(), True)
                masks.append(m)
            debug.record(rid, masks)
        # The request now lives in the fresh blocks; its row follows.
        state.block_ids = (list(cp.dst_block_ids),)
        row = runner.input_batch.req_id_to_index.get(rid)
        if row is not None:
            runner.input_batch.block_table.add_row(state.block_ids, row)
        self.offsets[rid] = cp.offset
        self.stash.pop(rid, None)
        self.filled.pop(rid, None)

    def _score(self, cfg: EvictionConfig, queries: torch.Tensor, ctx_slots: torch.Tensor,
               keep: int) -> torch.Tensor:
        """[layers, Hkv, keep] kept context indices; each layer's K/V is gathered only when the
        method measures it, so one layer's copy is alive at a time."""
        heads = self.num_kv_heads
        rows = ctx_slots.expand(heads, -1)
        needs_values = METHODS[cfg.method].uses_values
        weights = self.o_proj_weights() if needs_values else [None] * len(self.layers)

        def layer_inputs():
            for i, layer in enumerate(self.layers):
                k, v = self.layout.gather(layer.kv_cache, rows)
                yield LayerInputs(queries=queries[i], keys=k, values=v if needs_values else None,
                                  o_proj_weight=weights[i], scale=layer.impl.scale)

        shape = (len(self.layers), heads, ctx_slots.numel())
        return select_keep(cfg, layer_inputs(), keep, shape, self.device).to(torch.long)

    def _kv_views(self) -> KVViews:
        """Every layer's K and V halves, [num_blocks, block_size, Hkv, d] views of its cache."""
        return [layer.kv_cache[:, 0] for layer in self.layers], [layer.kv_cache[:, 1] for layer in self.layers]

    def _block_table(self, block_ids: list[int]) -> torch.Tensor:
        return torch.tensor(block_ids, dtype=torch.int32).to(self.device, non_blocking=True)

    def _score_paged(self, cfg: EvictionConfig, queries: torch.Tensor, kv_views: KVViews, src_table: torch.Tensor,
                     ctx: int, keep: int) -> torch.Tensor:
        """[layers, Hkv, keep] kept context indices, every layer measured from its pages at once."""
        keys, values = kv_views
        weights = self.o_proj_weights() if METHODS[cfg.method].uses_values else [None] * len(self.layers)
        req = PagedRequest(queries=queries, key_caches=keys, value_caches=values, block_table=src_table,
                           context_len=ctx, o_proj_weights=weights, scale=self.layers[0].impl.scale)
        return select_keep_paged(cfg, req, keep).to(torch.long)

    def _copy_paged(self, keep_idx: torch.Tensor, kv_views: KVViews, src_table: torch.Tensor, dst_blocks: list[int],
                    ctx: int, tail: int) -> None:
        """One launch: every layer's kept context tokens, then the tail, into the fresh blocks."""
        from .. import triton_kernels

        layers, heads, _ = keep_idx.shape
        tail_idx = torch.arange(ctx, ctx + tail, device=self.device).expand(layers, heads, tail)
        kept = torch.cat([keep_idx.to(torch.long), tail_idx], dim=2)
        keys, values = kv_views
        triton_kernels.compact_kv(keys, values, kept, src_table, self._block_table(dst_blocks))

    def take_stats(self) -> dict[str, WorkerStats] | None:
        stats, self.pending_stats = self.pending_stats, {}
        return stats or None


class _StepClock:
    """Scoring and compaction times without stalling the host: CUDA events on the compute stream
    (read later, see `WorkerStats.resolve`), host clocks where the device runs synchronously."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks = [self._now()]

    def _now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def mark(self) -> None:
        self.marks.append(self._now())

    def into(self, stats: WorkerStats) -> None:
        start, scored, copied = self.marks
        if self.cuda:
            stats.events = (start, scored, copied)
        else:
            stats.score_ms, stats.compact_ms = (scored - start) * 1e3, (copied - scored) * 1e3


# --- patches on the V1 model runner -----------------------------------------------------------


def install() -> None:
    Runner = compat.GPU_MODEL_RUNNER.resolve()
    AsyncOutput = compat.ASYNC_RUNNER_OUTPUT.resolve()
    ModelRunnerOutput = compat.MODEL_RUNNER_OUTPUT.resolve()
    empty = compat.EMPTY_MODEL_RUNNER_OUTPUT.resolve()

    def initialize_kv_cache(orig):
        def wrapper(self, kv_cache_config, *args, **kwargs):
            orig(self, kv_cache_config, *args, **kwargs)
            enabled = server_config(self.vllm_config.additional_config) is not None
            self._kvd = WorkerEviction(self) if enabled else None

        return wrapper

    def update_states(orig):
        def wrapper(self, scheduler_output):
            if self._kvd is not None:
                self._kvd.before_update_states(scheduler_output)
            return orig(self, scheduler_output)

        return wrapper

    def prepare_inputs(orig):
        def wrapper(self, scheduler_output, num_scheduled_tokens):
            result = orig(self, scheduler_output, num_scheduled_tokens)
            if self._kvd is not None:
                self._kvd.after_prepare_inputs(scheduler_output, num_scheduled_tokens)
            return result

        return wrapper

    def execute_model(orig):
        def wrapper(self, scheduler_output, intermediate_tensors=None):
            result = orig(self, scheduler_output, intermediate_tensors)
            if self._kvd is not None:
                self._kvd.after_execute()
            return result

        return wrapper

    def sample_tokens(orig):
        def wrapper(self, grammar_output):
            result = orig(self, grammar_output)
            if self._kvd is not None and self._kvd.pending_stats:
                target = result._model_runner_output if isinstance(result, AsyncOutput) else result
                if isinstance(target, ModelRunnerOutput) and target is not empty:
                    setattr(target, STATS_ATTR, self._kvd.take_stats())
            return result

        return wrapper

    Runner._kvd = None
    compat.patch_method(compat.RUNNER_INIT_KV_CACHE, initialize_kv_cache)
    compat.patch_method(compat.RUNNER_UPDATE_STATES, update_states)
    compat.patch_method(compat.RUNNER_PREPARE_INPUTS, prepare_inputs)
    compat.patch_method(compat.RUNNER_EXECUTE_MODEL, execute_model)
    compat.patch_method(compat.RUNNER_SAMPLE_TOKENS, sample_tokens)
