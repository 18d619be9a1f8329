"""Stage convert: remap the pretrained checkpoint (Mamba, or a Samba directory) into Samba's
chunked layout, or make a seeded random init when pretrained.use_pretrained is false; check
its logits against transformers; write it.

    python stages/convert.py --params params.yaml --out models/init
"""

import argparse

import _repo  # noqa: F401  (first: this repository's own samba)
from samba.cli import run_stage
from samba.config import load_params
from samba.convert import convert
from samba.io import require_writable


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", default="models/init")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    require_writable(args.out)
    report = convert(params, args.out)
    print(f"wrote {args.out}: {report}")


if __name__ == "__main__":
    run_stage("convert", main)
