"""Engine-core side of "logical positions stay, physical slots shrink".

After compaction a request's `num_computed_tokens` stays logical (RoPE positions, stop checks and
max-length caps keep working), but it owns only `logical - offset` slots. vLLM's full-attention
manager sizes block lists as `cdiv(num_tokens, block_size)`; this subclass subtracts the offset
first, and never hashes a compacted request's blocks (block i no longer holds tokens
[i*bs, (i+1)*bs), so its content does not match `request.block_hashes[i]`).

Installed by swapping `__class__` of the one FullAttentionManager the scheduler built (vLLM has no
hook to choose the manager class of a built-in spec).
"""

from __future__ import annotations

from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager


class OffsetFullAttentionManager(FullAttentionManager):
    # Set by install(): request id -> logical minus physical length. Present = compacted.
    kvd_offsets: dict[str, int]

    @classmethod
    def install(cls, manager: FullAttentionManager) -> "OffsetFullAttentionManager":
        if type(manager) is not FullAttentionManager:
            raise TypeError(f"expected vLLM's FullAttentionManager, got {type(manager).__name__}")
        manager.__class__ = cls
        manager.kvd_offsets = {}
        return manager  # type: ignore[return-value]

    def get_num_blocks_to_allocate(self, request_id, num_tokens, new_computed_blocks, total_computed_tokens,
                                   num_tokens_main_model, apply_admission_cap=False):
        off = self.kvd_offsets.get(request_id, 0)
        return super().get_num_blocks_to_allocate(
            request_id, num_tokens - off, new_computed_blocks, total_computed_tokens - off,
            num_tokens_main_model - off, apply_admission_cap=apply_admission_cap)

    def allocate_new_blocks(self, request_id, num_tokens, num_tokens_main_model):
        off = self.kvd_offsets.get(request_id, 0)
        return super().allocate_new_blocks(request_id, num_tokens - off, num_tokens_main_model - off)

    def cache_blocks(self, request, num_tokens, retention_interval=None):
        if request.request_id in self.kvd_offsets:
            return  # compacted blocks are never hashed
        super().cache_blocks(request, num_tokens, retention_interval=retention_interval)

    def pop_blocks_for_free(self, request_id):
        self.kvd_offsets.pop(request_id, None)
        return super().pop_blocks_for_free(request_id)

    # -- compaction -----------------------------------------------------------------------------
    def swap_blocks(self, request_id: str, new_blocks: list, offset: int) -> list:
        """Give the request `new_blocks` (already filled by the worker) and return its old ones."""
        old = self.req_to_blocks[request_id]
        self.req_to_blocks[request_id] = list(new_blocks)
        if request_id in self.num_cached_block:
            self.num_cached_block[request_id] = len(new_blocks)
        self.kvd_offsets[request_id] = offset
        return old
