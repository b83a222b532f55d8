"""SGLang KV pools whose per-layer buffers are kvcached views (SGLang 0.5.17 and 0.5.23:
both build their buffers in ``_create_buffers`` with the same attributes).

Same shapes, dtypes and strides as SGLang's own (``(size + page_size, H, D)`` per layer,
K and V of a layer adjacent for MHA; ``(size + page_size, 1, kv_cache_dim)`` for MLA),
at fixed addresses, with physical memory only under allocated pages. Configurations
whose buffers are not plain per-token rows (quantized KV, HND/5-D layouts, post-capture
VA backing, K/V of different head sizes, DSA) are refused loudly rather than served
without kvcached, and so is tensor or pipeline parallelism (see :func:`refuse_parallel`).
"""

from __future__ import annotations

from typing import Any

from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, MLATokenToKVPool

from kvcached.integrations.sglang.elastic import ElasticKV, KVShape
from kvcached.pool import KVLayout

__all__ = ["ElasticMHATokenToKVPool", "ElasticMLATokenToKVPool", "refuse_parallel"]


def _refuse(pool: Any, why: str) -> None:
    raise NotImplementedError(
        f"kvcached: {type(pool).__name__} with {why} is not supported by the SGLang integration; "
        "unset ENABLE_KVCACHED to run this configuration without kvcached"
    )


def refuse_parallel(pool: Any) -> None:
    """Refuse a pool built in a tensor- or pipeline-parallel SGLang.

    Every TP/PP rank runs the scheduler on its own copy of the pool and must take the
    same decisions as the others (SGLang takes the minimum free memory over the ranks
    when it sizes the pool for this reason). Elastic capacity differs per rank — each
    GPU's free memory, its control-plane limit, a map the driver refuses — so the ranks'
    ``available_size()`` and ``alloc()`` answers would diverge and the collectives hang.
    Agreeing on them would need a collective per scheduling decision; until then, refuse.
    """
    from sglang.srt.distributed import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return  # SGLang's own unit tests and single-process tools
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    pp_size = parallel_state.get_pipeline_model_parallel_world_size()
    if tp_size > 1 or pp_size > 1:
        _refuse(pool, f"tensor parallel size {tp_size} and pipeline parallel size {pp_size} (ranks would diverge)")


class ElasticMHATokenToKVPool(MHATokenToKVPool):
    """``MHATokenToKVPool`` over kvcached memory (see the module doc)."""

    kvcached_store: ElasticKV | None = None

    def _create_buffers(self) -> None:
        refuse_parallel(self)
        if self.is_quantized_kv_cache:
            _refuse(self, "a quantized KV cache")
        if self.post_capture_active:
            _refuse(self, "post-capture KV backing")
        if self.kv_cache_layout != "nhd":
            _refuse(self, f"the {self.kv_cache_layout!r} KV layout")
        if self.v_head_dim != self.head_dim:
            _refuse(self, "different K and V head sizes")
        num_slots = self.size + self.page_size
        store = ElasticKV(
            KVShape(KVLayout.SGLANG, self.layer_num, self.page_size, self.head_num, self.head_dim, num_slots),
            self.store_dtype,
            self.device,
            register=False,
        )
        self.kvcached_store = store
        tensors = store.pool.kv_tensors
        self.k_scale_buffer = self.v_scale_buffer = None
        self.native_k_scale_buffer = self.native_v_scale_buffer = None
        self.dq_k_buffer = self.dq_v_buffer = None
        self.k_buffer = [t[0, :num_slots] for t in tensors]
        self.v_buffer = [t[1, :num_slots] for t in tensors]
        # The padded page (slot 0's) is read by kernels for padded tokens.
        store.pinned_views = [b[: self.page_size] for b in (*self.k_buffer, *self.v_buffer)]
        store.zero_pinned()
        self._kv_buffer_descs = self._build_kv_buffer_descs()
        self._init_data_ptrs_and_strides()

    def _clear_buffers(self) -> None:
        super()._clear_buffers()
        if self.kvcached_store is not None:
            self.kvcached_store.close()
            self.kvcached_store = None


class ElasticMLATokenToKVPool(MLATokenToKVPool):
    """``MLATokenToKVPool`` over kvcached memory (see the module doc)."""

    kvcached_store: ElasticKV | None = None

    def _create_buffers(self) -> None:
        refuse_parallel(self)
        if self.use_dsa:
            _refuse(self, "DSA")
        num_slots = self.size + self.page_size
        store = ElasticKV(
            KVShape(KVLayout.MLA, self.layer_num, self.page_size, 1, self.kv_cache_dim, num_slots),
            self.store_dtype,
            self.device,
            register=False,
        )
        self.kvcached_store = store
        self.kv_buffer = [t.view(-1, 1, self.kv_cache_dim)[:num_slots] for t in store.pool.kv_tensors]
        store.pinned_views = [b[: self.page_size] for b in self.kv_buffer]
        store.zero_pinned()

    def _clear_buffers(self) -> None:
        super()._clear_buffers()
        if self.kvcached_store is not None:
            self.kvcached_store.close()
            self.kvcached_store = None
