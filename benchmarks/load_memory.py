"""Resident memory of loading SmolLM2-135M three ways, each in a fresh process.

    python benchmarks/load_memory.py

mmap: transformers' default (the weights stay pages of the cached safetensors file); disable_mmap:
transformers' ``disable_mmap=True`` (the file read into one bytes object, tensors copied out);
effnb: ``effnb.models.from_pretrained_in_memory`` (safetensors' pread backend, what
``effnb.load_model`` uses). Prints the resident set after loading, its anonymous part, the
high-water mark (VmHWM) and the wall time including imports.
"""

from __future__ import annotations

import subprocess
import sys

CHILD = r"""
import sys, time
t = time.perf_counter()
import torch
from transformers import AutoModelForCausalLM
import effnb.models as M
d = M.cache_dir() / "smollm2-135m"
mode = sys.argv[1]
if mode == "mmap":
    m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
elif mode == "disable_mmap":
    m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, disable_mmap=True)
else:
    m = M.from_pretrained_in_memory("causal-lm", d)
s = dict(line.split(":", 1) for line in open("/proc/self/status"))
mb = {k: int(s[k].split()[0]) // 1024 for k in ("VmRSS", "RssAnon", "VmHWM")}
print(f"{mode:13s} RSS {mb['VmRSS']:5d} MB (anonymous {mb['RssAnon']:5d})  peak {mb['VmHWM']:5d} MB  "
      f"{time.perf_counter() - t:.1f} s with imports")
"""


def main() -> int:
    import effnb

    effnb.load_model("smollm2-135m")  # converts the GGUF into the cache on a fresh machine
    for mode in ("mmap", "disable_mmap", "effnb"):
        subprocess.run([sys.executable, "-c", CHILD, mode], check=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
