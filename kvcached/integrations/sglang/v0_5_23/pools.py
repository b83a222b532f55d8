"""SGLang 0.5.23 KV pools whose per-layer buffers are kvcached views.

Same shapes, dtypes and strides as SGLang's own (``(size + page_size, H, D)`` per layer,
K and V of a layer adjacent for MHA; ``(size + page_size, 1, kv_cache_dim)`` for MLA),
at fixed addresses, with physical memory only under allocated pages. Configurations
whose buffers are not plain per-token rows (quantized KV, HND/5-D layouts, post-capture
VA backing, K/V of different head sizes, DSA) are refused loudly rather than served
without kvcached.
"""

from __future__ import annotations

from typing import Any

from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, MLATokenToKVPool

from kvcached.integrations.sglang.elastic import ElasticKV, KVShape
from kvcached.pool import KVLayout

__all__ = ["ElasticMHATokenToKVPool", "ElasticMLATokenToKVPool"]


def _refuse(pool: Any, why: str) -> None:
    raise NotImplementedError(
        f"kvcached: {type(pool).__name__} with {why} is not supported by the SGLang integration; "
        "unset ENABLE_KVCACHED to run this configuration without kvcached"
    )


class ElasticMHATokenToKVPool(MHATokenToKVPool):
    """``MHATokenToKVPool`` over kvcached memory (see the module doc)."""

    kvcached_store: ElasticKV | None = None

    def _create_buffers(self) -> None:
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
        )
        self.kvcached_store = store
        tensors = store.pool.kv_tensors
        self.k_scale_buffer = self.v_scale_buffer = None
        self.native_k_scale_buffer = self.native_v_scale_buffer = None
        self.dq_k_buffer = self.dq_v_buffer = None
        self.k_buffer = [t[0, :num_slots] for t in tensors]
        self.v_buffer = [t[1, :num_slots] for t in tensors]
        for k, v in zip(self.k_buffer, self.v_buffer, strict=True):  # the padded page is read by kernels
            k[: self.page_size].zero_()
            v[: self.page_size].zero_()
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
        if self.use_dsa:
            _refuse(self, "DSA")
        num_slots = self.size + self.page_size
        store = ElasticKV(
            KVShape(KVLayout.MLA, self.layer_num, self.page_size, 1, self.kv_cache_dim, num_slots),
            self.store_dtype,
            self.device,
        )
        self.kvcached_store = store
        self.kv_buffer = [t.view(-1, 1, self.kv_cache_dim)[:num_slots] for t in store.pool.kv_tensors]
        for buf in self.kv_buffer:
            buf[: self.page_size].zero_()

    def _clear_buffers(self) -> None:
        super()._clear_buffers()
        if self.kvcached_store is not None:
            self.kvcached_store.close()
            self.kvcached_store = None
