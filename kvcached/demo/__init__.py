"""``kvctl demo``'s engines: real KV pools in the control plane, driven by bursty request streams.

:mod:`.workload` (request streams), :mod:`.scheduler` (continuous batching over a block
source), :mod:`.pool` (the engines' pool), :mod:`.engine` (one engine process),
:mod:`.runner` (start/stop N of them in a fresh segment), :mod:`.summary` (elastic vs a
static split). No torch unless asked for (``tensors=True``); no printing but the engine
process's protocol lines.
"""
