#!/usr/bin/env python3
"""Compiles kernels/<stem>.cu as the CUDA backend does (prelude prepended) with NVRTC for
sm_90 and prints ptxas's resource usage per kernel (registers, spills, shared memory), with
no GPU. Usage: scripts/nvrtc-regs.py [--lib DIR] STEM [FILTER]   (DIR: libnvrtc.so.13's
folder, default $PAGODA_NVRTC_DIR or ~/.cache/pagoda/nvrtc-13.0.88)."""
import ctypes, os, re, sys

args = sys.argv[1:]
lib = os.environ.get("PAGODA_NVRTC_DIR") or os.path.expanduser("~/.cache/pagoda/nvrtc-13.0.88")
if args and args[0] == "--lib":
    lib, args = args[1], args[2:]
stem = args[0]
flt = args[1] if len(args) > 1 else ""
root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "backends", "cuda", "kernels")
src = open(os.path.join(root, "common.cuh")).read() + f'\n#line 1 "{stem}.cu"\n' + open(os.path.join(root, stem + ".cu")).read()
ctypes.CDLL(os.path.join(lib, "libnvrtc-builtins.so.13.0"), mode=ctypes.RTLD_GLOBAL)
nv = ctypes.CDLL(os.path.join(lib, "libnvrtc.so.13"))
prog = ctypes.c_void_p()
assert nv.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), f"{stem}.cu".encode(), 0, None, None) == 0
opts = [b"--std=c++17", b"--fmad=true", b"-default-device", b"--gpu-architecture=sm_90", b"--ptxas-options=-v"]
arr = (ctypes.c_char_p * len(opts))(*opts)
rc = nv.nvrtcCompileProgram(prog, len(opts), arr)
n = ctypes.c_size_t()
nv.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
log = ctypes.create_string_buffer(n.value)
nv.nvrtcGetProgramLog(prog, log)
text = log.value.decode(errors="replace")
if rc != 0:
    print(text)
    sys.exit(f"nvrtc failed ({rc})")
cur = None
for line in text.splitlines():
    m = re.search(r"Compiling entry function '(\w+)'", line)
    if m:
        cur = m.group(1)
        continue
    if cur and flt in cur and ("Used" in line or "spill" in line):
        print(f"{cur:28} {line.split('info    :')[-1].strip()}")
