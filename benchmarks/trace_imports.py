"""Which code imports the heavy modules, and when: runs a script with an audit hook that prints,
for the first import of each watched module, the seconds since start and the calling frames
(``-X importtime`` names what was imported, not who asked for it). Also says whether bytecode
is cached (a process that compiles its imports from source pays seconds for it).

  python benchmarks/trace_imports.py [--import MODULE] stages/evaluate.py --params ... (the script's arguments)

``--import MODULE`` imports MODULE whole first (``--import mamba_ssm``: as the stage did before
ops/kernels.py stopped running mamba-ssm's package ``__init__``).
"""

from __future__ import annotations

import importlib
import runpy
import sys
import time
import traceback
from pathlib import Path

WATCH = ("transformers", "sklearn", "sympy", "torch._dynamo", "torch._inductor", "torch.distributed.tensor",
         "torch.distributed.fsdp", "torch._higher_order_ops.triton_kernel_wrap", "matplotlib", "triton",
         "mamba_ssm.models.mixer_seq_simple")
START = time.perf_counter()
_seen: set[str] = set()


def _hook(event: str, args) -> None:
    if event != "import" or args[0] not in WATCH or args[0] in _seen:
        return
    _seen.add(args[0])
    frames = [f for f in traceback.extract_stack()[:-1] if "importlib" not in f.filename and f.filename != __file__]
    where = " <- ".join(f"{f.filename.split('site-packages/')[-1]}:{f.lineno} {f.name}" for f in frames[::-1][:6])
    print(f"[trace_imports] {time.perf_counter() - START:6.2f} s  {args[0]}  from {where}", file=sys.stderr, flush=True)


def main() -> None:
    print(f"[trace_imports] pycache_prefix={sys.pycache_prefix} dont_write_bytecode={sys.flags.dont_write_bytecode}",
          file=sys.stderr)
    if len(sys.argv) < 2 or (sys.argv[1] == "--import" and len(sys.argv) < 4):
        sys.exit(f"usage: python {sys.argv[0]} [--import MODULE] SCRIPT [ARGS...]\n{__doc__}")
    sys.addaudithook(_hook)
    if sys.argv[1] == "--import":
        importlib.import_module(sys.argv[2])
        del sys.argv[1:3]
    script, sys.argv = sys.argv[1], sys.argv[1:]
    sys.path.insert(0, str(Path(script).resolve().parent))  # as `python script` would
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        print(f"[trace_imports] {time.perf_counter() - START:6.2f} s  done", file=sys.stderr)


if __name__ == "__main__":
    main()
