"""The fast path: mamba-ssm's and causal-conv1d's CUDA kernels, when they import.

Used: ``mamba_inner_fn`` (training: conv + scan + projections fused), ``causal_conv1d_fn`` +
``selective_scan_fn`` (no-grad forward, and the prefill of generation, which needs the last
state), mamba-ssm's Triton ``layer_norm_fn`` (residual add + RMSNorm in one kernel, as its own
blocks do), and the one-token ``causal_conv1d_update`` / ``selective_state_update`` (decoding).
Nothing here is a kernel of ours. Both packages need CUDA to build, so a CPU install has
neither; ``kernels_available()`` says whether the fast path can run, and the model falls
back to the plain-PyTorch reference (``selective_scan.py``) otherwise.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import sys

logger = logging.getLogger(__name__)

# mamba-ssm's Triton RMSNorm is autotuned in every new process, by default: about 2 s at the
# first batch of each stage on an H200 (benchmarks/results/2026-11-29/gpu_session_2.log). Triton
# keeps the tuned choice on disk, beside its compiled kernels, when this is set before mamba-ssm
# is imported; a value the user set wins.
os.environ.setdefault("TRITON_CACHE_AUTOTUNING", "1")


def defer_package_init(name: str) -> None:
    """Let ``name``'s submodules import without running the package's ``__init__`` first; the
    first attribute looked up on the package itself (``from name import X``, ``name.__version__``)
    runs it then, once. Does nothing if ``name`` is imported already or is not a package here.

    Why: mamba-ssm's ``__init__`` imports its models, and through them transformers' generation
    utilities, torch.distributed, sympy and scikit-learn, for none of the kernels used here. On
    an H200 the evaluate stage took 22.6 s with it and 15.3 s without, in one call
    (benchmarks/results/2026-11-29/evaluate_imports.log)."""
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None or spec.submodule_search_locations is None:
        return  # not installed (the import below says so) or not a package: import as usual
    package = importlib.util.module_from_spec(spec)  # __path__ and __spec__ set, __init__ not run

    def run_init(attr: str):
        del package.__getattr__
        try:
            spec.loader.exec_module(package)
        except BaseException:
            package.__getattr__ = run_init
            raise
        return getattr(package, attr)

    package.__getattr__ = run_init  # PEP 562: called for names the module does not have (yet)
    sys.modules[name] = package


defer_package_init("mamba_ssm")

try:  # pragma: no cover - exercised on the GPU machine
    from causal_conv1d import causal_conv1d_fn, causal_conv1d_update
    from mamba_ssm.ops.selective_scan_interface import mamba_inner_fn, selective_scan_fn
    from mamba_ssm.ops.triton.layer_norm import layer_norm_fn
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update

    _IMPORT_ERROR: Exception | None = None
except Exception as err:  # ImportError, or a CUDA extension that fails to load
    causal_conv1d_fn = causal_conv1d_update = mamba_inner_fn = selective_scan_fn = None
    layer_norm_fn = selective_state_update = None
    _IMPORT_ERROR = err

BACKENDS = ("auto", "kernels", "reference")
_announced: set[str] = set()
_why_reference = ["forced by backend='reference'"]  # what the log says of a forced reference path
_quiet = [False]


@contextlib.contextmanager
def reference_forced_by(why: str):
    """Within, a model built with backend='reference' gives ``why`` in the log line of its path:
    said by code that forces that path whatever compute.backend says (convert's logits check)."""
    _why_reference.append(why)
    try:
        yield
    finally:
        _why_reference.pop()


@contextlib.contextmanager
def unannounced():
    """Within, the path is chosen without its log line (said at the next call outside): for a
    measurement whose path is no news, before a refusal that must be the only line printed."""
    _quiet.append(True)
    try:
        yield
    finally:
        _quiet.pop()


def kernels_available() -> bool:
    return _IMPORT_ERROR is None


def kernels_import_error() -> Exception | None:
    return _IMPORT_ERROR


def use_kernels(backend: str, is_cuda: bool) -> bool:
    """Decide the mixer's path for one call; say the choice once per process."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        choice, why = False, _why_reference[-1]
    elif not is_cuda:
        if backend == "kernels":
            raise RuntimeError("backend='kernels' needs CUDA tensors; the model is on the CPU")
        choice, why = False, "tensors are on the CPU"
    elif not kernels_available():
        if backend == "kernels":
            raise RuntimeError(
                "backend='kernels' but mamba-ssm / causal-conv1d do not import "
                f"({_IMPORT_ERROR!r}); install them with: pip install --no-build-isolation "
                "-r requirements-cuda.txt")
        choice, why = False, f"mamba-ssm / causal-conv1d do not import: {_IMPORT_ERROR!r}"
    else:
        choice, why = True, "CUDA tensors and kernels available"
    message = ("Mamba mixer: mamba-ssm CUDA kernels" if choice
               else "Mamba mixer: plain-PyTorch reference scan") + f" ({why})"
    if message not in _announced and not _quiet[-1]:
        _announced.add(message)
        logger.info(message)
    return choice
