"""Zero-shot evaluation through EleutherAI's lm-evaluation-harness, chunk-output sparsity applied.

    python -m samba.zeroshot MODEL_DIR --tasks T1,T2 [--head main|readout] [--include-path DIR]
                             [--limit N] [--batch-size B] [--output FILE] [--device D]
    python -m samba.zeroshot compare A.json B.json

lm-eval's tasks run unchanged; only the model is ours: ``SambaLM`` is an lm-eval ``LM``
(registered as ``samba``) that answers its three kinds of request with a Samba model, from
either head, with the model's own ``sparsity_target`` applied:

- ``loglikelihood``: log P(continuation | context) and whether greedy decoding gives the
  continuation. Requests are bucketed by padded length (powers of two up to ``max_length``)
  and continuation length, and each bucket's batches have one shape, so on CUDA a batch is
  one replayed CUDA graph (``cuda_graphs.GraphedCallable``). Only the continuation's
  positions reach the vocabulary projection, in slices: the (batch x length x vocab) logits
  are never built.
- ``loglikelihood_rolling``: lm-eval's rolling windows of ``max_length`` tokens (2,048, as
  its transformers backend uses for Mamba), scored the same way.
- ``generate_until``: ``samba.generate`` with one kept ``Decoder`` (batch 1), stopped at the
  request's stop strings.

Offline, a task reads local files (``dataset_path: json`` with ``dataset_kwargs.data_files``,
a relative path read from the current directory); ``benchmarks/zeroshot_tasks/`` has such
tasks, which take lm-eval's own definitions and change only where the data comes from. A task
that needs the Hugging Face Hub when the Hub cannot be reached is refused before anything is
loaded, naming the task.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..config import ConfigError
from ..generate import HEADS
from ..io import require_writable
from .compare import compare
from .errors import ZeroShotError
from .lm import MAX_LENGTH, PRECISIONS, SambaLM
from .tasks import check_sources, evaluate_tasks, hub_can_serve, write_results

logger = logging.getLogger(__name__)


def _limit(text: str) -> float | int:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return int(value) if value >= 1 else value


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m samba.zeroshot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", help="a Samba model directory (it records its tokenizer)")
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval task, group or tag names")
    parser.add_argument("--head", choices=HEADS, default="main")
    parser.add_argument("--include-path", action="append", default=[],
                        help="a directory of task YAML files (repeatable), e.g. benchmarks/zeroshot_tasks")
    parser.add_argument("--limit", type=_limit, default=None, help="documents per task (< 1: a fraction); for tests")
    parser.add_argument("--batch-size", type=int, default=32, help="rows per scoring batch (default %(default)s)")
    parser.add_argument("--batch-tokens", type=int, default=0,
                        help="> 0: rows per batch = this // the batch's padded length, instead of --batch-size")
    parser.add_argument("--max-length", type=int, default=MAX_LENGTH, help="context window (default %(default)s)")
    parser.add_argument("--output", default=None, help="write lm-eval's results, configs and versions as JSON")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto", help="auto: bf16 autocast on CUDA")
    parser.add_argument("--no-cuda-graphs", action="store_true", help="run every batch eagerly")
    parser.add_argument("--bootstrap-iters", type=int, default=100000,
                        help="lm-eval's bootstrap for the stderr of non-mean metrics (0: none)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer.json or its directory, if the model has none")
    args = parser.parse_args(argv)
    if min(args.batch_size, args.max_length) < 1 or min(args.batch_tokens, args.bootstrap_iters) < 0:
        raise ConfigError("--batch-size and --max-length must be >= 1, --batch-tokens and --bootstrap-iters >= 0")
    return args


def run(argv: list[str]) -> dict:
    """The evaluation command: check, load, evaluate, print, write. Returns lm-eval's results."""
    from ..model_files import require_model_dir

    args = parse_args(argv)
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not names:
        raise ZeroShotError("--tasks names no task")
    include = [Path(p) for p in args.include_path]
    for path in include:
        if not path.is_dir():
            raise ZeroShotError(f"--include-path {path}: not a directory")
    if args.output:
        require_writable(args.output)
    require_model_dir(args.model_dir, "train")
    hub_ok = hub_can_serve()  # before lm-eval imports datasets
    check_sources(names, include, hub_ok)
    lm = SambaLM(args.model_dir, args.tokenizer, args.head, args.batch_size, args.batch_tokens, args.max_length,
                 args.device, args.precision, cuda_graphs=not args.no_cuda_graphs)
    results = evaluate_tasks(lm, names, include, hub_ok, args.limit, args.bootstrap_iters)
    from lm_eval.utils import make_table

    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    if args.output:
        write_results(args.output, results)
        logger.info("wrote %s", args.output)
    return results


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "compare":  # a model directory named 'compare' is ./compare
        compare(argv[1:])
    else:
        run(argv)
