"""Stage train: fine-tune with CE(main) + readout_weight * CE(readout) + pruning_weight * penalty,
in compute.num_processes data-parallel processes.

    python stages/train.py --params params.yaml --data data/tokenized --init models/init \
        --out models/samba --metrics metrics/train --checkpoints checkpoints/train

With compute.num_processes > 1 this starts the processes itself (torchrun --standalone); on
several hosts, start it with torchrun on each (docs/gpu.md, "Several GPUs").
"""

import argparse
import signal
import sys

import _repo  # noqa: F401  (first: this repository's own samba)
from samba import distributed
from samba.cli import run_stage
from samba.config import load_params
from samba.data import read_meta
from samba.distill import distilling, require_teacher
from samba.io import require_writable
from samba.model_files import require_model_dir
from samba.runtime import check_processes, resolve_device
from samba.train import check_params, train


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", default="data/tokenized")
    parser.add_argument("--init", default="models/init")
    parser.add_argument("--out", default="models/samba")
    parser.add_argument("--metrics", default="metrics/train")
    parser.add_argument("--checkpoints", default="checkpoints/train",
                        help="resumable state, kept until the run completes")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    # Everything that can be refused is refused here, in one process, before any work.
    check_params(params)
    if distributed.under_launcher():  # torchrun by hand (several hosts): params must say how many
        distributed.check_world_size(params.compute.num_processes)
    else:
        check_processes(params.compute)
        resolve_device(params.compute)
    read_meta(args.data)
    require_model_dir(args.init, "convert")
    if distilling(params.training):
        require_teacher(params.training.teacher)
    require_writable(args.out, args.metrics, args.checkpoints)
    n = params.compute.num_processes
    if n > 1 and not distributed.under_launcher():
        sys.exit(distributed.launch(n, __file__, sys.argv[1:] if argv is None else argv))
    summary = train(params, args.data, args.init, args.out, args.metrics, args.checkpoints)
    # The run is complete and its checkpoint gone: a SIGTERM now (a sweep's deadline) would only
    # lose it before DVC records the stage. The process is exiting anyway.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if distributed.context_from_env().is_main:
        print(f"wrote {args.out}: {summary}")


if __name__ == "__main__":
    run_stage("train", main)
