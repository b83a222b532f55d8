"""The states :class:`~kvcached.integrations.vllm.pages.VllmPages` records.

A block is *free*, *used* (``ref_cnt > 0``) or *cached* (free in vLLM's eyes but holding a
prefix-cache hash, so its contents must stay). A page group is unmapped, being mapped by
the prefetch thread, mapped, or being unmapped (driver calls run outside the lock on groups
in the two transient states, which nobody else touches meanwhile).
"""

FREE, USED, CACHED = 0, 1, 2
UNMAPPED, MAPPING, MAPPED, UNMAPPING = 0, 1, 2, 3
