"""CPU-only simulation aid (never used on the GPU machine).

An out-of-tree vLLM platform plugin that reports an H100 so that `vllm serve`
on a machine without a GPU walks the real start-up path — argument parsing,
config and tokenizer loading, attention-backend selection, engine-core process
start, worker imports — until the first real CUDA call fails. Registered
through the `vllm.platform_plugins` entry point of the dist-info beside it;
active only when this folder is on PYTHONPATH and FAKECUDA=1.
"""

import os


def register() -> str | None:
    if os.environ.get("FAKECUDA") != "1":
        return None
    return "fakecuda_plugin.FakeH100Platform"


def _make():
    from vllm.platforms.cuda import NonNvmlCudaPlatform
    from vllm.platforms.interface import DeviceCapability

    class FakeH100Platform(NonNvmlCudaPlatform):
        @classmethod
        def get_device_capability(cls, device_id: int = 0):
            return DeviceCapability(major=9, minor=0)

        @classmethod
        def get_device_name(cls, device_id: int = 0) -> str:
            return "NVIDIA H100 80GB HBM3"

        @classmethod
        def get_device_total_memory(cls, device_id: int = 0) -> int:
            return 80 * 2**30

        @classmethod
        def is_fully_connected(cls, physical_device_ids) -> bool:
            return False

    return FakeH100Platform


def __getattr__(name):
    if name == "FakeH100Platform":
        cls = _make()
        globals()[name] = cls
        return cls
    raise AttributeError(name)
