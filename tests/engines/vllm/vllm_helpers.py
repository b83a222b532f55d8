"""What the vLLM engine tests share: a KV cache config of vLLM's own classes."""

from __future__ import annotations

from typing import Any


def kv_cache_config(num_blocks: int, num_layers: int, block_size: int = 16) -> tuple[Any, list[str]]:
    """A single-group full-attention ``KVCacheConfig`` (fp16, 2 KV heads of 64) in the
    layer-outermost layout of vLLM 0.29+ (one buffer, each layer a run of whole blocks),
    and its layer names."""
    import torch
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec, KVCacheTensor

    spec = FullAttentionSpec(block_size=block_size, num_kv_heads=2, head_size=64, dtype=torch.float16)
    page = spec.page_size_bytes
    layers = [f"model.layers.{i}.self_attn.attn" for i in range(num_layers)]
    config = KVCacheConfig(
        num_blocks=num_blocks,
        kv_cache_tensors=[KVCacheTensor(size=num_layers * page * num_blocks, layers=layers,
                                        layer_stride=page * num_blocks, block_stride=page)],
        kv_cache_groups=[KVCacheGroupSpec(layer_names=layers, kv_cache_spec=spec)],
    )
    return config, layers
