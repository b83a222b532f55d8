#!/usr/bin/env python3
"""Repack the big wheels of the SGLang 0.5.17 payload without what a dense model on the
Triton attention backend on an H100/H200 never loads, so the payload fits few device calls.
Other wheels are copied unchanged.

Usage: slim_wheels.py OUT_DIR IN.whl... [--keep-sm100]

Dropped from sglang-kernel 0.4.5 (the kernel package SGLang 0.5.17 pins):
  sgl_kernel/flash_ops.abi3.so          FlashAttention-3 (1.07 GB): imported only by
                                        sgl_kernel.flash_attn, which SGLang imports inside
                                        the FA3 attention backend (and on XPU/vision paths)
  sgl_kernel/flashmla_ops.abi3.so       FlashMLA: sgl_kernel.flash_mla imports it under try
  sgl_kernel/infllm_ops*.so             InfLLM-V2 sparse attention: loaded on first call
  sgl_kernel/sm100/common_ops.abi3.so   the ops built for compute capability != 9.0
                                        (Blackwell; --keep-sm100 keeps them)
Kept: sgl_kernel/sm90/common_ops.abi3.so (loaded at ``import sgl_kernel`` on a 9.0 GPU:
norms, activations, rotary, sampling helpers), all Python code, triton_kernels.

Dropped from xgrammar 0.2.1 (imported at start-up through server_args):
  xgrammar/lib/libxgrammar.a            the static library for C++ users (62 MB); Python
                                        loads libxgrammar_bindings.so
The RECORD of a slimmed wheel is rewritten so pip installs the result normally.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import shutil
import sys
import zipfile
from pathlib import Path

# wheel file name prefix -> path prefixes dropped from it
DROP: dict[str, tuple[str, ...]] = {
    "sglang_kernel-": (
        "sgl_kernel/flash_ops.abi3.so",
        "sgl_kernel/flashmla_ops.abi3.so",
        "sgl_kernel/infllm_ops",
    ),
    "xgrammar-": ("xgrammar/lib/libxgrammar.a",),
}
SM100 = "sgl_kernel/sm100/common_ops.abi3.so"


def _digest(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def slim(src: Path, dst: Path, drop: tuple[str, ...]) -> int:
    """Write ``src`` without the members starting with a ``drop`` prefix; return the bytes dropped."""
    rows, dropped_bytes = [], 0
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zout:
        record = next(n for n in zin.namelist() if n.endswith(".dist-info/RECORD"))
        for info in zin.infolist():
            name = info.filename
            if name == record:
                continue
            if name.startswith(drop):
                dropped_bytes += info.file_size
                continue
            data = zin.read(info)
            out = zipfile.ZipInfo(name, date_time=info.date_time)
            out.external_attr = info.external_attr  # keep the mode bits of the .so files
            out.compress_type = zipfile.ZIP_DEFLATED
            zout.writestr(out, data, compresslevel=9)
            rows.append((name, _digest(data), str(len(data))))
        rows.append((record, "", ""))
        text = io.StringIO()
        csv.writer(text, lineterminator="\n").writerows(rows)
        info = zipfile.ZipInfo(record, date_time=(2026, 1, 1, 0, 0, 0))
        info.external_attr = 0o644 << 16
        zout.writestr(info, text.getvalue(), compress_type=zipfile.ZIP_DEFLATED)
    return dropped_bytes


def main() -> int:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    if len(args) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    out_dir = Path(args[0])
    out_dir.mkdir(parents=True, exist_ok=True)
    for src in map(Path, args[1:]):
        dst = out_dir / src.name
        drop = next((d for prefix, d in DROP.items() if src.name.startswith(prefix)), None)
        if drop is None:
            shutil.copyfile(src, dst)
            continue
        if src.name.startswith("sglang_kernel-") and "--keep-sm100" not in sys.argv:
            drop = (*drop, SM100)
        dropped_bytes = slim(src, dst, drop)
        print(f"{dst.name}: {src.stat().st_size / 2**20:.1f} -> {dst.stat().st_size / 2**20:.1f} MiB "
              f"(dropped {dropped_bytes / 2**20:.0f} MiB uncompressed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
