"""Zero-shot evaluation through EleutherAI's lm-evaluation-harness, chunk-output sparsity applied:
``python -m samba.zeroshot MODEL_DIR --tasks T1,T2 ...`` and ``python -m samba.zeroshot compare
A.json B.json`` (``command``'s docstring, the command's ``--help``, says what they do).

Importing the package registers ``SambaLM`` as lm-eval's ``samba`` model.
"""

# The parts, each importing only those above it: scorer (log P(continuation | context), batched
# by shape), lm (the lm-eval model), task_index (the one reader of lm-eval's private modules),
# tasks (offline checks, loading, evaluating), compare, command (the command line).
from .errors import ZeroShotError
from .scorer import Scorer, bucket, length_buckets
from .lm import END_OF_TEXT, MAX_LENGTH, SambaLM
from .tasks import check_sources, evaluate_tasks, hub_can_serve, load_tasks, write_results
from .compare import compare, compare_rows, format_compare, read_metrics, sample_counts
from .command import main, parse_args, run

__all__ = ["END_OF_TEXT", "MAX_LENGTH", "SambaLM", "Scorer", "ZeroShotError", "bucket", "check_sources", "compare",
           "compare_rows", "evaluate_tasks", "format_compare", "hub_can_serve", "length_buckets", "load_tasks", "main",
           "parse_args", "read_metrics", "run", "sample_counts", "write_results"]
