"""The local data of benchmarks/zeroshot_tasks/: lm-eval's tasks without the Hugging Face Hub.

    python benchmarks/zeroshot_data.py --out .gpu/zeroshot --wikitext ../shared/data/wikitext-2-raw/wiki.test.raw \
        [--lambada lambada_test.jsonl] [--piqa valid.jsonl valid-labels.lst] [--winogrande winogrande.jsonl]

Each output is gzipped JSON lines (``datasets``' json reader reads them as they are) with the
fields the Hub's copy has, so that lm-eval's own task definition runs on it unchanged:

- ``wikitext-2-raw-test-documents.jsonl.gz``: {"page"} per article of WikiText-2's raw test
  split, cut at its `` = Title = `` lines by ``samba.data.split_articles`` (the Hub's
  ``EleutherAI/wikitext_document_level``, which lm-eval's ``wikitext`` task reads, is the same
  split into articles; its exact bytes were not compared, the Hub being out of reach);
- ``lambada_openai_test.jsonl.gz``: OpenAI's LAMBADA test file ({"text"}), as it is;
- ``piqa_validation.jsonl.gz``: PIQA's ``valid.jsonl`` with ``valid-labels.lst`` as "label";
- ``winogrande_xl_validation.jsonl.gz``: {"sentence", "option1", "option2", "answer"} rebuilt
  from llm-foundry's copy of the dev set, which holds lm-eval's two contexts and its target
  (see ``winogrande_docs``).

The inputs are checked against the SHA-256 in ``SOURCES`` (where each came from); ``SHA256SUMS``
and ``SOURCES.md`` are written beside the outputs.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from samba.data import split_articles  # noqa: E402

# input -> (repository, commit, path, SHA-256 of the file), read with `git show COMMIT:PATH`
SOURCES = {
    "wikitext": ("../shared/data (see its README.md)", "-", "wikitext-2-raw/wiki.test.raw",
                 "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08"),
    "lambada": ("BlinkDL/ChatRWKV", "965e40b85288a91c94c02bfa56adc3ce0fa20a82", "misc/lambada_test.jsonl",
                "4aa8d02cd17c719165fc8a7887fddd641f43fcafa4b1c806ca8abc31fabdb226"),
    "piqa_questions": ("ybisk/ybisk.github.io", "21edab439af693b961be2f069e8690a88d3b4e37", "piqa/data/valid.jsonl",
                       "93503cc97c679e459b065c3d13e848282e44b2a25213985bed3e5d458abef72d"),
    "piqa_labels": ("ybisk/ybisk.github.io", "21edab439af693b961be2f069e8690a88d3b4e37",
                    "piqa/data/valid-labels.lst",
                    "b4192dc3a2a0363d9d60ccf79800cbbe2f32ebb17726efdde6970e0b8131bceb"),
    "winogrande": ("mosaicml/llm-foundry", "8c8dd48f72168c5d51e2f7b151595892a8fba43d",
                   "scripts/eval/local_data/language_understanding/winogrande.jsonl",
                   "ea1592526f3bfdd0948ed3acb1b4dfa3f83d23698917118688ee1df7f8d4b8d7"),
}
EXPECTED_ROWS = {"wikitext-2-raw-test-documents": 62, "lambada_openai_test": 5153, "piqa_validation": 1838,
                 "winogrande_xl_validation": 1267}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_checked(path: Path, source: str) -> bytes:
    data = path.read_bytes()
    expected = SOURCES[source][3]
    if expected is not None and sha256(data) != expected:
        raise SystemExit(f"{path}: SHA-256 {sha256(data)} is not the {source} file expected ({expected}); "
                         f"take {SOURCES[source][2]} of {SOURCES[source][0]} at {SOURCES[source][1]}")
    return data


def jsonl(rows) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")


def wikitext_docs(raw: bytes) -> list[dict]:
    return [{"page": page} for page in split_articles(raw.decode("utf-8").splitlines(keepends=True))]


def piqa_docs(questions: bytes, labels: bytes) -> list[dict]:
    docs = [json.loads(line) for line in questions.decode("utf-8").splitlines() if line.strip()]
    answers = [int(line) for line in labels.decode("utf-8").split()]
    if len(docs) != len(answers):
        raise SystemExit(f"PIQA: {len(docs)} questions but {len(answers)} labels")
    return [{"goal": d["goal"], "sol1": d["sol1"], "sol2": d["sol2"], "label": a} for d, a in zip(docs, answers)]


def winogrande_docs(data: bytes) -> list[dict]:
    """llm-foundry keeps lm-eval's view of a WinoGrande question: the two contexts (the sentence
    up to the blank, each option in it) and the target (the rest, stripped). The sentence is
    rebuilt with the blank after the contexts' common prefix (backed off to a word boundary), so
    that lm-eval's doc_to_choice and doc_to_target give those two contexts and that target back
    exactly (checked here for every row)."""
    docs = []
    for line in data.decode("utf-8").splitlines():
        row = json.loads(line)
        first, second = row["context_options"]
        common = 0
        while common < min(len(first), len(second)) and first[common] == second[common]:
            common += 1
        cut = first.rfind(" ", 0, common) + 1 if " " in first[:common] else 0
        sentence = first[:cut] + "_ " + row["continuation"]
        doc = {"sentence": sentence, "option1": first[cut:], "option2": second[cut:], "answer": str(row["gold"] + 1)}
        blank = sentence.index("_")
        if ([sentence[:blank] + doc["option1"], sentence[:blank] + doc["option2"]] != [first, second]
                or sentence[blank + 1:].strip() != row["continuation"]):
            raise SystemExit(f"WinoGrande: cannot rebuild {row}")
        docs.append(doc)
    return docs


def write_gzip(path: Path, data: bytes) -> bytes:
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0) as f:  # the same bytes each time
        f.write(data)
    path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


def sources_note(inputs: dict[str, Path]) -> str:
    lines = ["# Where the zero-shot data came from (written by benchmarks/zeroshot_data.py)", "",
             "| input | repository | commit | path | SHA-256 |", "|---|---|---|---|---|"]
    for name, path in inputs.items():
        repo, commit, where, _ = SOURCES[name]
        lines.append(f"| {name} | {repo} | {commit} | {where} | {sha256(path.read_bytes())} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--wikitext", required=True, type=Path, help="wiki.test.raw of WikiText-2 (raw)")
    parser.add_argument("--lambada", type=Path, help="OpenAI's lambada_test.jsonl")
    parser.add_argument("--piqa", type=Path, nargs=2, metavar=("VALID_JSONL", "VALID_LABELS"))
    parser.add_argument("--winogrande", type=Path, help="llm-foundry's winogrande.jsonl")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    inputs = {"wikitext": args.wikitext}
    outputs = {"wikitext-2-raw-test-documents": jsonl(wikitext_docs(read_checked(args.wikitext, "wikitext")))}
    if args.lambada:
        inputs["lambada"] = args.lambada
        outputs["lambada_openai_test"] = read_checked(args.lambada, "lambada")  # its own bytes
    if args.piqa:
        inputs["piqa_questions"], inputs["piqa_labels"] = args.piqa
        outputs["piqa_validation"] = jsonl(piqa_docs(read_checked(args.piqa[0], "piqa_questions"),
                                                     read_checked(args.piqa[1], "piqa_labels")))
    if args.winogrande:
        inputs["winogrande"] = args.winogrande
        outputs["winogrande_xl_validation"] = jsonl(winogrande_docs(read_checked(args.winogrande, "winogrande")))
    sums = []
    for name, data in outputs.items():
        rows = len([line for line in data.decode("utf-8").splitlines() if json.loads(line)])
        if rows != EXPECTED_ROWS[name]:
            raise SystemExit(f"{name}: {rows} rows, expected {EXPECTED_ROWS[name]}")
        packed = write_gzip(args.out / f"{name}.jsonl.gz", data)
        sums.append(f"{sha256(packed)}  {name}.jsonl.gz")
        print(f"{args.out / name}.jsonl.gz: {rows} rows, {len(packed):,} bytes")
    (args.out / "SHA256SUMS").write_text("\n".join(sums) + "\n")
    (args.out / "SOURCES.md").write_text(sources_note(inputs))


if __name__ == "__main__":
    main()
