#!/usr/bin/env python3
"""Repack a vLLM wheel without the parts a dense model on the Triton attention
backend never loads, so it can travel to the offline GPU machine in few pieces.

Usage: slim_wheel.py IN.whl OUT_DIR [--keep-moe]

Dropped (each is imported lazily, for other models/features, or under
try/except ImportError in vLLM 0.26.0; checked by scripts/gpu/simulate_cpu.sh):
  vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so       FlashAttention-2 kernels (291 MiB; pre-Hopper)
  vllm/_moe_C_stable_libtorch.abi3.so            fused-MoE kernels (dense models never call them)
  vllm/vllm-rs                                   Rust frontend, only with VLLM_USE_RUST_FRONTEND=1
  vllm/_flashmla_C*.so, vllm/_qutlass_C*.so      MLA / FP4-quant kernels
  vllm/third_party/{deep_gemm,fmha_sm100,tml_fa4}/  FP8 GEMM + Blackwell attention JIT sources
Kept: all other Python code, vllm/_C_stable_libtorch.abi3.so (ops registered at
import of vllm.platforms.cuda), vllm/vllm_flash_attn/_vllm_fa3_C.abi3.so (FA3,
Hopper: `vllm.vllm_flash_attn` raises ImportError unless FA2 or FA3 loads, and
llama.py imports it through layers.attention -> mm_encoder_attention ->
fa_utils even when the Triton backend is chosen), cumem_allocator (sleep mode),
spinloop, fs_io_C, _rust_tool_parser. The RECORD is rewritten so pip installs the result normally.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import sys
import zipfile
from pathlib import Path

DROP_FILES = {
    "vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so",
    "vllm/_moe_C_stable_libtorch.abi3.so",
    "vllm/vllm-rs",
    "vllm/_flashmla_C.abi3.so",
    "vllm/_flashmla_extension_C.abi3.so",
    "vllm/_qutlass_C.abi3.so",
}
DROP_PREFIXES = (
    "vllm/third_party/deep_gemm/",
    "vllm/third_party/fmha_sm100/",
    "vllm/third_party/tml_fa4/",
)


def _hash(data: bytes) -> str:
    d = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
    return "sha256=" + d.decode()


def main() -> int:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    keep_moe = "--keep-moe" in sys.argv
    src, out_dir = Path(args[0]), Path(args[1])
    drop = set(DROP_FILES)
    if keep_moe:
        drop.discard("vllm/_moe_C_stable_libtorch.abi3.so")
    out_dir.mkdir(parents=True, exist_ok=True)
    dst = out_dir / src.name
    kept, dropped_bytes = [], 0
    with (
        zipfile.ZipFile(src) as zin,
        zipfile.ZipFile(dst, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zout,
    ):
        record_name = next(n for n in zin.namelist() if n.endswith(".dist-info/RECORD"))
        for info in zin.infolist():
            name = info.filename
            if name == record_name:
                continue
            if name in drop or name.startswith(DROP_PREFIXES):
                dropped_bytes += info.file_size
                continue
            data = zin.read(info)
            # keep the permission bits (executables, .so files)
            zi = zipfile.ZipInfo(name, date_time=info.date_time)
            zi.external_attr = info.external_attr
            zi.compress_type = zipfile.ZIP_DEFLATED
            zout.writestr(zi, data, compresslevel=9)
            kept.append((name, _hash(data), str(len(data))))
        kept.append((record_name, "", ""))
        zr = zipfile.ZipInfo(record_name, date_time=(2026, 1, 1, 0, 0, 0))
        zr.external_attr = 0o644 << 16
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(kept)
        zout.writestr(zr, buf.getvalue(), compress_type=zipfile.ZIP_DEFLATED)
    print(f"{dst}: {dst.stat().st_size / 2**20:.1f} MiB (dropped {dropped_bytes / 2**20:.0f} MiB uncompressed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
