"""samba.zeroshot: lm-eval's numbers for a Samba model against independent computations (full
logits of model(...), a transformers export, the project's own evaluation, samba.generate)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from samba.data import TokenWindows
from samba.evaluate import evaluate_model
from samba.generate import generate
from samba.hub import HubUnavailableError

from conftest import TINY_SAMBA, WORDS, make_corpus, make_tokenizer, tiny_samba, tool_env

import samba.zeroshot as zeroshot  # lm-eval is in requirements.txt: a failing import is a failure, not a skip
from lm_eval.api.instance import Instance

CFG = TINY_SAMBA  # the tiny Samba of conftest.tiny_samba
EOT = "<|endoftext|>"



@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """The tests' byte-level BPE with an end-of-text token (lm-eval's prefix for empty contexts)."""
    from tokenizers import Tokenizer

    root = tmp_path_factory.mktemp("zeroshot_tok")
    make_tokenizer(make_corpus(root / "corpus"), root / "tok")
    tok = Tokenizer.from_file(str(root / "tok/tokenizer.json"))
    tok.add_special_tokens([EOT])
    tok.save(str(root / "tok/tokenizer.json"))
    return tok


def _lm(model, tokenizer, head="main", **kwargs):
    return zeroshot.SambaLM(model, tokenizer, head=head, device="cpu", **kwargs)


def _sentence(rng, lo=3, hi=9):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def _full_logprob(model, head, context: list[int], continuation: list[int]) -> float:
    """log P(continuation | context) from the full logits of one forward pass, in fp64."""
    with torch.no_grad():
        out = model(torch.tensor([context + continuation]))
    logits = (out.logits if head == "main" else out.readout_logits)[0].double()
    logprobs = logits.log_softmax(-1)
    return sum(float(logprobs[len(context) - 1 + j, t]) for j, t in enumerate(continuation))


# ----------------------------------------------------------------------------- a local multiple-choice task

def _mc_docs(n_docs: int = 6, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"question": _sentence(rng), "choices": [_sentence(rng, 1, 4) for _ in range(3)], "label": rng.randrange(3)}
            for _ in range(n_docs)]


def _write_mc_task(root: Path, docs: list[dict]) -> Path:
    (root / "data").mkdir(parents=True)
    (root / "data/mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (root / "tasks").mkdir()
    (root / "tasks/tiny_mc.yaml").write_text(yaml.safe_dump({
        "task": "tiny_mc", "dataset_path": "json", "dataset_name": None,
        "dataset_kwargs": {"data_files": {"test": str(root / "data/mc.jsonl")}}, "test_split": "test",
        "output_type": "multiple_choice", "doc_to_text": "{{question}}", "doc_to_choice": "choices",
        "doc_to_target": "label", "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]}))
    return root / "tasks"


def _choice_logprobs(model, head, tokenizer, doc) -> list[float]:
    """The harness's split of each choice: context = the question's tokens, continuation = the
    rest of the tokens of question + ' ' + choice."""
    context = tokenizer.encode(doc["question"]).ids
    return [_full_logprob(model, head, context, tokenizer.encode(doc["question"] + " " + c).ids[len(context):])
            for c in doc["choices"]]


@pytest.mark.parametrize("target,head", [(0.0, "main"), (0.5, "main"), (0.5, "readout")])
def test_multiple_choice_acc_equals_the_full_logits(tmp_path, tokenizer, target, head, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model = tiny_samba(target, seed=1)
    docs = _mc_docs()
    lls = [_choice_logprobs(model, head, tokenizer, d) for d in docs]
    best = [max(range(3), key=lambda i: ll[i]) for ll in lls]
    for i, d in enumerate(docs):  # right on every other question: acc is 0.5 by construction
        d["label"] = best[i] if i % 2 == 0 else (best[i] + 1) % 3
    acc_norm = sum(max(range(3), key=lambda i: ll[i] / len(d["choices"][i])) == d["label"]
                   for ll, d in zip(lls, docs)) / len(docs)
    lm = _lm(model, tokenizer, head, batch_size=4)
    tasks = _write_mc_task(tmp_path, docs)
    results = zeroshot.evaluate_tasks(lm, ["tiny_mc"], [tasks], hub_ok=True, bootstrap_iters=0)["results"]["tiny_mc"]
    assert results["acc,none"] == pytest.approx(0.5) and results["acc_norm,none"] == pytest.approx(acc_norm)

    # each request's log-likelihood, not only the argmax
    requests = [Instance("loglikelihood", {}, (d["question"], " " + c), 0) for d in docs for c in d["choices"]]
    got = [ll for ll, _ in lm.loglikelihood(requests, disable_tqdm=True)]
    want = [ll for row in lls for ll in row]
    assert max(abs(a - b) for a, b in zip(got, want)) < 1e-4


def test_loglikelihoods_equal_a_transformers_export(tmp_path, tokenizer):
    from transformers import MambaForCausalLM

    from samba.export import export

    model = tiny_samba(seed=2)
    model.save_pretrained(tmp_path / "samba")
    export(tmp_path / "samba", tmp_path / "hf")
    hf = MambaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    rng = random.Random(3)
    pairs = [(tokenizer.encode(_sentence(rng)).ids, tokenizer.encode(" " + _sentence(rng, 1, 5)).ids)
             for _ in range(12)]
    for i in range(0, 12, 3):  # some continuations are transformers' greedy ones (3 tokens: one padded slot)
        greedy = hf.generate(torch.tensor([pairs[i][0]]), max_new_tokens=3, do_sample=False, pad_token_id=0)
        pairs[i] = (pairs[i][0], greedy[0, -3:].tolist())
    got = _lm(model, tokenizer, batch_size=5).scorer.score(pairs)
    assert [greedy for _, greedy in got[::3]] == [True] * 4
    for (context, continuation), (ll, greedy) in zip(pairs, got):
        with torch.no_grad():
            logits = hf(torch.tensor([context + continuation])).logits[0].double()
        logprobs = logits.log_softmax(-1)[len(context) - 1:-1]
        want = float(logprobs.gather(1, torch.tensor(continuation)[:, None]).sum())
        assert ll == pytest.approx(want, abs=1e-4)
        assert greedy == bool((logprobs.argmax(-1) == torch.tensor(continuation)).all())


def test_long_inputs_are_cut_from_the_left_and_buckets_do_not_change_the_numbers(tokenizer):
    model = tiny_samba(seed=4)
    rng = random.Random(5)
    pairs = [(tokenizer.encode(_sentence(rng, 5, 40)).ids, tokenizer.encode(" " + _sentence(rng, 1, 3)).ids)
             for _ in range(20)]
    assert max(len(c) + len(x) for c, x in pairs) > 25 and max(len(x) for _, x in pairs) <= 24
    lm = _lm(model, tokenizer, batch_size=3, max_length=24)
    got = lm.scorer.score(pairs)
    for (context, continuation), (ll, _) in zip(pairs, got):
        tokens = (context + continuation)[-25:]  # max_length + 1
        want = _full_logprob(model, "main", tokens[:-len(continuation)], continuation)
        assert ll == pytest.approx(want, abs=1e-4)
    # other batch shapes (rows per batch, token budget), same numbers
    again = _lm(model, tokenizer, batch_tokens=50, max_length=24).scorer.score(pairs)
    assert max(abs(a[0] - b[0]) for a, b in zip(got, again)) < 1e-5


def test_an_empty_context_is_refused_and_lm_evals_empty_contexts_are_scored(tokenizer):
    model = tiny_samba(seed=12)
    lm = _lm(model, tokenizer, batch_size=4)
    continuation = tokenizer.encode(" the cat sat").ids
    with pytest.raises(zeroshot.ZeroShotError, match="an empty context"):  # not position -1 of the batch
        lm.scorer.score([(tokenizer.encode("a dog").ids, continuation), ([], continuation)])
    # lm-eval itself never sends one: an empty context becomes the end-of-text token, or the
    # continuation's first token where that is the end-of-text token
    requests = [Instance("loglikelihood", {}, ("", " the cat sat"), 0),
                Instance("loglikelihood", {}, ("", EOT + " the cat sat"), 1)]
    got = [ll for ll, _ in lm.loglikelihood(requests, disable_tqdm=True)]
    want = _full_logprob(model, "main", [tokenizer.token_to_id(EOT)], continuation)
    assert got == pytest.approx([want, want], abs=1e-4)


# ----------------------------------------------------------------------------- rolling windows

@pytest.mark.parametrize("head", ["main", "readout"])
def test_rolling_loglikelihood_equals_the_projects_evaluation(tokenizer, head):
    """lm-eval's windows of L tokens: the first feeds [EOT] + tokens[:L-1]; window j >= 1 feeds
    tokens[jL-1 : (j+1)L-1] and scores tokens[jL : (j+1)L] -- the project's windows shifted by
    L-1 tokens (TokenWindows' offset)."""
    model, L = tiny_samba(0.5, seed=6), 16
    rng, text = random.Random(7), ""
    while True:
        text += _sentence(rng) + " .\n"
        tokens = tokenizer.encode(text).ids
        if len(tokens) >= 5 * L and len(tokens) % L == 0:
            break
    lm = _lm(model, tokenizer, head, batch_size=3, max_length=L)
    (got,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)

    eot = tokenizer.token_to_id(EOT)
    first = _full_logprob(model, head, [eot], tokens[:L])  # [EOT] + tokens[:L-1] scoring tokens[:L]
    windows = TokenWindows(torch.tensor(tokens), L, offset=L - 1)
    assert len(windows) == len(tokens) // L - 1
    metrics, _ = evaluate_model(model, windows, batch_size=2, count_sparsity=False, desc=None)
    loss = metrics["loss"] if head == "main" else metrics["readout_loss"]
    rest = -loss * metrics["tokens"]
    assert metrics["tokens"] == len(tokens) - L
    assert got == pytest.approx(first + rest, rel=1e-6, abs=1e-4)


# ----------------------------------------------------------------------------- sparsity, generation

def test_the_models_sparsity_is_applied(tokenizer):
    sparse = tiny_samba(0.75, seed=8)
    dense = tiny_samba(0.75, seed=8)
    dense.set_sparsity_target(0.0)
    rng = random.Random(9)
    requests = [Instance("loglikelihood", {}, (_sentence(rng), " " + _sentence(rng, 1, 3)), 0) for _ in range(8)]
    with_sparsity = [ll for ll, _ in _lm(sparse, tokenizer).loglikelihood(requests, disable_tqdm=True)]
    without = [ll for ll, _ in _lm(dense, tokenizer).loglikelihood(requests, disable_tqdm=True)]
    assert max(abs(a - b) for a, b in zip(with_sparsity, without)) > 1e-2
    assert _lm(sparse, tokenizer).get_model_info()["sparsity_target"] == 0.75


@pytest.mark.parametrize("head", ["main", "readout"])
def test_generation_is_samba_generate_greedy_cut_at_the_stop_string(tokenizer, head):
    model = tiny_samba(0.5, seed=10)
    lm = _lm(model, tokenizer, head)
    context = "the cat sat on"
    new = generate(model, torch.tensor([tokenizer.encode(context).ids]), 12, head, temperature=0.0)[0].tolist()
    eot = tokenizer.token_to_id(EOT)
    full = tokenizer.decode(new[:new.index(eot)] if eot in new else new)
    assert len(full) > 4
    stop = full[len(full) // 2:len(full) // 2 + 2]
    requests = [Instance("generate_until", {}, (context, {"until": [], "max_gen_toks": 12, "do_sample": False}), 0),
                Instance("generate_until", {}, (context, {"until": [stop], "max_gen_toks": 12}), 1)]
    assert lm.generate_until(requests, disable_tqdm=True) == [full, full.split(stop)[0]]


# ----------------------------------------------------------------------------- offline, the command line

def test_tasks_that_need_the_hub_or_missing_files_are_refused_by_name(tmp_path, monkeypatch):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "hub_group.yaml").write_text(yaml.safe_dump({"group": "hub_group", "task": [{"task": "hellaswag"}]}))
    local = {"task": "hellaswag", "dataset_path": "json",
             "dataset_kwargs": {"data_files": {"validation": "nope.jsonl"}}}
    (tasks / "local_group.yaml").write_text(yaml.safe_dump({"group": "local_group", "task": [local]}))
    with pytest.raises(HubUnavailableError, match=r"task 'hellaswag' is not defined under --include-path.*"
                                                  r"Hub, which cannot be reached.*dataset_path: json"):
        zeroshot.check_sources(["hellaswag"], [tasks], hub_ok=False)
    with pytest.raises(HubUnavailableError, match=r"task 'hub_group' \(its task 'hellaswag'\)"):
        zeroshot.check_sources(["hub_group"], [tasks], hub_ok=False)
    with pytest.raises(zeroshot.ZeroShotError, match=r"task 'local_group' \(its task 'hellaswag'\): data file "
                                                     r"nope.jsonl not found"):
        zeroshot.check_sources(["local_group"], [tasks], hub_ok=False)
    (tmp_path / "nope.jsonl").write_text("{}\n")
    monkeypatch.chdir(tmp_path)  # a relative data file is read from the current directory
    assert zeroshot.check_sources(["local_group"], [tasks], hub_ok=False)  # uses lm-eval's own 'hellaswag'


@pytest.mark.slow  # starts processes (or runs long): not in the fast tier
def test_command_refuses_a_hub_task_within_seconds_in_one_line(tmp_path):
    tiny_samba().save_pretrained(tmp_path / "m")
    env = {k: v for k, v in tool_env().items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # nothing listens there: the Hub cannot be reached
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "samba.zeroshot", str(tmp_path / "m"), "--tasks", "hellaswag",
                           "--device", "cpu"], capture_output=True, text=True, env=env, timeout=300)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()  # the whole of stderr: the one refusal line
    assert len(lines) == 1 and lines[0].startswith("[zeroshot] error: task 'hellaswag'"), proc.stderr
    assert "--include-path" in lines[0] and proc.stdout == ""
    assert elapsed < 60, elapsed  # imports only: nothing waits on the Hub


@pytest.mark.slow  # starts processes (or runs long): not in the fast tier
def test_command_writes_results_and_compare_tabulates_them(tmp_path, tokenizer, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tasks = _write_mc_task(tmp_path / "mc", _mc_docs())
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    for name, target in (("dense", 0.0), ("sparse", 0.75)):
        tiny_samba(target, seed=11).save_pretrained(tmp_path / name,
                                                extra_files={"tokenizer.json": tmp_path / "tokenizer.json"})
        zeroshot.main([str(tmp_path / name), "--tasks", "tiny_mc", "--include-path", str(tasks), "--device", "cpu",
                       "--bootstrap-iters", "0", "--output", str(tmp_path / f"{name}.json")])
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("dense", "sparse"))
    assert {"results", "configs", "versions"} <= set(a) and "samples" not in a
    assert a["config"]["sparsity_target"] == 0.0 and b["config"]["sparsity_target"] == 0.75
    capsys.readouterr()
    zeroshot.main(["compare", str(tmp_path / "dense.json"), str(tmp_path / "sparse.json")])
    rows = {tuple(c.strip() for c in line.strip("|").split("|"))[:2]: line
            for line in capsys.readouterr().out.splitlines() if line.startswith("| tiny_mc")}
    for metric in ("acc", "acc_norm"):
        va, vb = a["results"]["tiny_mc"][f"{metric},none"], b["results"]["tiny_mc"][f"{metric},none"]
        cells = [c.strip() for c in rows["tiny_mc", metric].strip("|").split("|")]
        assert cells[2:] == [f"{va:.4f}", f"{vb:.4f}", f"{vb - va:+.4f}"]
    assert "note:" not in capsys.readouterr().out  # the same documents on both sides
    smaller = json.loads((tmp_path / "sparse.json").read_text())
    smaller["results"]["tiny_mc"]["sample_len"] -= 1  # as from a run with a smaller --limit
    (tmp_path / "smaller.json").write_text(json.dumps(smaller))
    zeroshot.main(["compare", str(tmp_path / "dense.json"), str(tmp_path / "smaller.json")])
    n = a["results"]["tiny_mc"]["sample_len"]
    assert f"note: tiny_mc: A scored {n} documents and B {n - 1}" in capsys.readouterr().out
    with pytest.raises(zeroshot.ZeroShotError, match="has no 'results'"):
        zeroshot.main(["compare", str(tmp_path / "dense.json"), str(tmp_path / "tokenizer.json")])


def test_lm_eval_finds_the_model_under_its_registered_name():
    from lm_eval.api.registry import get_model

    assert get_model("samba") is zeroshot.SambaLM  # what `lm_eval --model samba` takes
