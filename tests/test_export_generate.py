"""Export to transformers and recurrent generation, against transformers and the full forward."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys

import pytest
import torch

from samba import Samba
from samba.config import Params
from samba.convert import convert
from samba.data import prepare_tokens
from samba.export import EXPORT_FILES, TOKENIZER_FILES, ExportError, export
from samba.generate import Decoder, generate, sample

from conftest import TINY_SAMBA, relative_error, tiny_params, tiny_samba, tool_env

CFG = TINY_SAMBA  # the tiny Samba of conftest.tiny_samba



# ----------------------------------------------------------------------------- the recurrent step

@pytest.mark.parametrize("target", [0.0, 0.5])
@pytest.mark.parametrize("head", ["main", "readout"])
@pytest.mark.parametrize("prompt_len", [1, 5])
def test_recurrent_step_equals_the_full_forward(target, head, prompt_len):
    model = tiny_samba(target)
    ids = torch.randint(0, 264, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)
    want = full.logits if head == "main" else full.readout_logits
    decoder = Decoder(model, batch_size=2, head=head)
    got = [decoder.prefill(ids[:, :prompt_len])]
    for t in range(prompt_len, 13):
        got.append(decoder.step(ids[:, t]))
    got = torch.stack(got, dim=1)  # predictions after positions prompt_len-1 .. 12
    assert relative_error(got, want[:, prompt_len - 1:]) < 1e-5


def test_sampling():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9]])
    assert sample(logits, 0.0, 1.0, None).tolist() == [1]
    # top_p small enough keeps only the most likely token
    draws = {int(sample(logits, 1.0, 0.3, torch.Generator().manual_seed(s))) for s in range(20)}
    assert draws == {1}
    a = [int(sample(logits, 1.0, 1.0, torch.Generator().manual_seed(7))) for _ in range(3)]
    assert len(set(a)) == 1  # same seed, same draw
    assert len({int(sample(logits, 1.0, 1.0, torch.Generator().manual_seed(s))) for s in range(40)}) > 2


# ----------------------------------------------------------------------------- export

def test_export_gives_transformers_the_main_head_and_samba_everything_back(tmp_path):
    from transformers import AutoTokenizer, MambaForCausalLM

    from conftest import make_corpus, make_tokenizer

    model = tiny_samba()
    make_corpus(tmp_path / "corpus")
    make_tokenizer(tmp_path / "corpus", tmp_path / "tok", vocab_size=264)
    model.save_pretrained(tmp_path / "samba", extra_files={"tokenizer.json": tmp_path / "tok/tokenizer.json"})
    report = export(tmp_path / "samba", tmp_path / "hf")
    assert report["tokenizer"]
    # exactly what --force may replace (samba.export.describe_out_dir)
    assert {p.name for p in (tmp_path / "hf").iterdir()} == EXPORT_FILES | TOKENIZER_FILES
    hf = MambaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, 264, (2, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert relative_error(theirs, ours.logits) < 1e-4
    back = Samba.from_pretrained(tmp_path / "hf").eval()
    assert back.config == model.config
    with torch.no_grad():
        again = back(ids)
    assert torch.equal(again.logits, ours.logits) and torch.equal(again.readout_logits, ours.readout_logits)
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok.decode(tok("the cat sat")["input_ids"]) == "the cat sat"


def test_greedy_main_head_equals_transformers_generate(tmp_path):
    from transformers import MambaForCausalLM

    model = tiny_samba(seed=3)
    model.save_pretrained(tmp_path / "samba")
    export(tmp_path / "samba", tmp_path / "hf")
    assert {p.name for p in (tmp_path / "hf").iterdir()} == EXPORT_FILES  # no tokenizer recorded
    hf = MambaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    prompt = torch.randint(0, 264, (2, 6), generator=torch.Generator().manual_seed(4))
    ours = generate(model, prompt, 20, temperature=0.0)
    theirs = hf.generate(prompt, max_new_tokens=20, do_sample=False, min_new_tokens=20, pad_token_id=0)
    assert torch.equal(ours, theirs[:, 6:])


def test_a_kept_decoder_gives_what_a_fresh_one_gives():
    model = tiny_samba(target=0.5, seed=8)
    g = torch.Generator().manual_seed(9)
    prompts = [torch.randint(0, 264, (2, n), generator=g) for n in (5, 9)]
    decoder = Decoder(model, 2, "readout")
    decoder.warm_up()  # steps on placeholder tokens, whose states the prefill must overwrite
    for prompt in prompts:  # the second call starts from the first call's states and must not see them
        kept = generate(model, prompt, 12, head="readout", temperature=0.0, decoder=decoder)
        assert torch.equal(kept, generate(model, prompt, 12, head="readout", temperature=0.0))
    with torch.no_grad():  # new weights after the decoder was made (as after more training)
        for chunk in model.chunks:
            for layer in chunk.layers:
                layer.mixer.A_log.add_(0.3)
    kept = generate(model, prompts[0], 12, head="readout", temperature=0.0, decoder=decoder)
    assert torch.equal(kept, generate(model, prompts[0], 12, head="readout", temperature=0.0))
    with pytest.raises(ValueError, match="made for batch size 2, head 'readout'"):
        generate(model, prompts[0][:1], 3, head="readout", decoder=decoder)
    with pytest.raises(ValueError, match="head 'main'"):
        generate(model, prompts[0], 3, head="main", decoder=decoder)


def _spoil_weights(model_dir):
    """A model directory whose config is sound and whose weights cannot be read: what is
    refused from the config alone is refused here as there."""
    (model_dir / "model.safetensors").write_bytes(b"not the weights")
    return model_dir


def test_a_sparse_model_is_refused_from_its_config_and_dropped_reads_back_dense(sources, tmp_path):
    from transformers import MambaForCausalLM

    params = Params.from_dict(tiny_params(sources), require_all=True)
    prepare_tokens(params.dataset, tmp_path / "data")
    convert(params, tmp_path / "init")
    model = Samba.from_pretrained(tmp_path / "init").eval()
    model.set_sparsity_target(0.75)
    model.save_pretrained(tmp_path / "sparse")
    model.save_pretrained(tmp_path / "spoilt")
    _spoil_weights(tmp_path / "spoilt")
    for source in ("sparse", "spoilt"):
        with pytest.raises(ExportError) as refused:
            export(tmp_path / source, tmp_path / "hf", data_dir=tmp_path / "data")
        assert str(refused.value) == (
            f"{tmp_path / source} zeroes 75% of every chunk output (model.sparsity_target 0.75), which plain Mamba "
            "cannot compute; pass --drop-sparsity to export the dense model instead, which measures what that costs "
            f"(test ppl with and without on {tmp_path / 'data'}: minutes on a CPU, shown with a progress bar), "
            "prints it and records it in samba.json")
    for data, why in ((None, "none was given"), (tmp_path, f"{tmp_path} has no test.bin")):
        with pytest.raises(ExportError, match=rf"sparsity_target 0.75\), .*--drop-sparsity .* given --data naming "
                                              rf"tokenized data \({re.escape(why)}\), also measures and prints"):
            export(tmp_path / "spoilt", tmp_path / "hf", data_dir=data)
    assert not (tmp_path / "hf").exists()

    report = export(tmp_path / "sparse", tmp_path / "hf", drop_sparsity=True, data_dir=tmp_path / "data")
    dropped = report["dropped_sparsity"]
    assert report["sparsity_target"] == 0.0 and dropped["sparsity_target"] == 0.75
    assert dropped["ppl_with_sparsity"] != dropped["ppl_without"] and dropped["windows"] > 0
    written = json.loads((tmp_path / "hf/samba.json").read_text())
    assert written["model"]["sparsity_target"] == 0.0 and written["dropped_sparsity"] == dropped
    # one folder, one model: Samba.from_pretrained (and so samba.generate) and transformers read
    # the dense model that was exported, and the source is as it was
    back = Samba.from_pretrained(tmp_path / "hf").eval()
    hf = MambaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert back.config == dataclasses.replace(model.config, sparsity_target=0.0)
    ids = torch.randint(0, 264, (2, 11), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        sparse = model(ids)
        model.set_sparsity_target(0.0)
        dense, again, theirs = model(ids), back(ids), hf(ids).logits
    assert torch.equal(again.logits, dense.logits) and torch.equal(again.readout_logits, dense.readout_logits)
    assert relative_error(theirs, again.logits) < 1e-4
    assert relative_error(sparse.logits, dense.logits) > 1e-2  # the sparsity did matter
    assert Samba.from_pretrained(tmp_path / "sparse").config.sparsity_target == 0.75


# ----------------------------------------------------------------------------- the command line

@pytest.mark.slow  # starts processes (or runs long): not in the fast tier
def test_generate_command_streams_the_greedy_text(sources, tmp_path):
    from tokenizers import Tokenizer

    params = Params.from_dict(tiny_params(sources), require_all=True)
    prepare_tokens(params.dataset, tmp_path / "data")
    convert(params, tmp_path / "init")
    model = Samba.from_pretrained(tmp_path / "init")
    model.save_pretrained(tmp_path / "m", extra_files={"tokenizer.json": tmp_path / "data/tokenizer.json"})
    for head in ("main", "readout"):
        proc = subprocess.run([sys.executable, "-m", "samba.generate", str(tmp_path / "m"), "--prompt", "the cat",
                               "--max-new-tokens", "12", "--temperature", "0", "--head", head, "--device", "cpu"],
                              capture_output=True, text=True, env=tool_env())
        assert proc.returncode == 0, proc.stderr
        tok = Tokenizer.from_file(str(tmp_path / "data/tokenizer.json"))
        prompt = torch.tensor([tok.encode("the cat").ids])
        want = generate(model, prompt, 12, head=head, temperature=0.0)
        assert proc.stdout == "the cat" + tok.decode(want[0].tolist()) + "\n"
        # stdout is the text alone (above); the log is on stderr, whole before the text starts
        assert re.fullmatch(r"(\[generate\] [^\n]*\n)+", proc.stderr), proc.stderr
        assert "[generate] Mamba mixer: plain-PyTorch reference scan" in proc.stderr
        merged = subprocess.run([sys.executable, "-m", "samba.generate", str(tmp_path / "m"), "--prompt", "the cat",
                                 "--max-new-tokens", "12", "--temperature", "0", "--head", head, "--device", "cpu"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=tool_env())
        assert merged.stdout == proc.stderr + proc.stdout  # unbuffered (tool_env), as on a terminal
    bad = subprocess.run([sys.executable, "-m", "samba.generate", str(tmp_path / "init"), "--prompt", "x"],
                         capture_output=True, text=True, env=tool_env())
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "records no tokenizer" in bad.stderr
    assert json.loads((tmp_path / "m/config.json").read_text())["format"] == "samba"


@pytest.mark.slow  # starts processes (or runs long): not in the fast tier
def test_generate_says_there_is_no_model_where_there_is_none(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "samba.generate", str(tmp_path / "nonexistent"), "--prompt", "x"],
                          capture_output=True, text=True, env=tool_env())
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == (f"[generate] error: {tmp_path / 'nonexistent'}: no model there; run the train stage "
                           "first (dvc repro train)\n")


@pytest.mark.slow  # starts processes (or runs long): not in the fast tier
def test_export_command_refuses_a_sparse_model_at_once_and_shows_progress_when_dropping(project, tmp_path):
    model = tiny_samba()
    model.set_sparsity_target(0.5)
    model.save_pretrained(tmp_path / "sparse")
    model.save_pretrained(tmp_path / "spoilt")
    _spoil_weights(tmp_path / "spoilt")  # refused before the weights are read: these never are
    command = [sys.executable, "-m", "samba.export", "--data", str(project / "data")]
    proc = subprocess.run(command + [str(tmp_path / "spoilt"), str(tmp_path / "hf")],
                          capture_output=True, text=True, env=tool_env())
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    assert proc.stderr == (
        f"[export] error: {tmp_path / 'spoilt'} zeroes 50% of every chunk output (model.sparsity_target 0.5), which "
        "plain Mamba cannot compute; pass --drop-sparsity to export the dense model instead, which measures what that "
        f"costs (test ppl with and without on {project / 'data'}: minutes on a CPU, shown with a progress bar), "
        "prints it and records it in samba.json\n")
    ok = subprocess.run(command + [str(tmp_path / "sparse"), str(tmp_path / "hf"), "--drop-sparsity"],
                        capture_output=True, text=True, env=tool_env())
    assert ok.returncode == 0, ok.stderr
    assert "test ppl with the sparsity" in ok.stderr and "test ppl without" in ok.stderr  # the progress bars
    assert re.search(r"\[export\] dropping the chunk-output sparsity \(0.5\): test ppl [\d.]+ with it, [\d.]+ "
                     r"without, on the first \d+ windows\n", ok.stderr), ok.stderr
    report = json.loads(ok.stdout.removeprefix(f"wrote {tmp_path / 'hf'}: "))
    assert report["sparsity_target"] == 0.0 and report["dropped_sparsity"]["sparsity_target"] == 0.5
    assert json.loads((tmp_path / "hf/samba.json").read_text())["dropped_sparsity"] == report["dropped_sparsity"]


def _contents(path):
    """Everything at ``path``, to compare before and after: bytes, links and folders."""
    if path.is_symlink():
        return ("link", str(path.readlink()))
    if path.is_file():
        return path.read_bytes()
    return {str(p.relative_to(path)): _contents(p) if not p.is_dir() or p.is_symlink() else "folder"
            for p in sorted(path.rglob("*"))}


@pytest.mark.slow  # starts processes (or runs long): not in the fast tier
def test_export_command_never_replaces_a_folder_that_is_not_an_earlier_export(tmp_path):
    # the report of issue 23: another model and a notes file, exported into with --force
    tiny_samba(seed=1).save_pretrained(tmp_path / "samba")
    tiny_samba(seed=2).save_pretrained(tmp_path / "hf")
    (tmp_path / "hf/notes.txt").write_text("the user's")
    before = _contents(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "samba.export", str(tmp_path / "samba"), str(tmp_path / "hf"),
                           "--force"], capture_output=True, text=True, env=tool_env())
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == (f"[export] error: {tmp_path / 'hf'} exists and is not an earlier export (it holds "
                           "notes.txt, which export does not write); --force replaces only an earlier export: "
                           "export to another folder\n")
    assert _contents(tmp_path) == before
    # the command passes --force on as given: an earlier export is refused without it, replaced with it
    export_cmd = [sys.executable, "-m", "samba.export", str(tmp_path / "samba")]
    first = subprocess.run(export_cmd + [str(tmp_path / "out")], capture_output=True, text=True, env=tool_env())
    assert first.returncode == 0, first.stderr
    again = subprocess.run(export_cmd + [str(tmp_path / "out")], capture_output=True, text=True, env=tool_env())
    assert again.returncode == 2 and "exists already (an earlier export); pass --force to replace it" in again.stderr
    forced = subprocess.run(export_cmd + [str(tmp_path / "out"), "--force"], capture_output=True, text=True,
                            env=tool_env())
    assert forced.returncode == 0, forced.stderr


def test_force_replaces_an_earlier_export_and_nothing_else(tmp_path):
    from conftest import make_corpus, make_tokenizer

    make_corpus(tmp_path / "corpus")
    make_tokenizer(tmp_path / "corpus", tmp_path / "tok", vocab_size=264)
    a, b = tiny_samba(seed=1), tiny_samba(seed=2)
    a.save_pretrained(tmp_path / "a", extra_files={"tokenizer.json": tmp_path / "tok/tokenizer.json"})
    b.save_pretrained(tmp_path / "b")
    sources = _contents(tmp_path / "a"), _contents(tmp_path / "b")
    out = tmp_path / "out"

    export(tmp_path / "a", out)  # with the tokenizer's files
    with pytest.raises(ExportError) as refused:
        export(tmp_path / "b", out)
    assert str(refused.value) == f"{out} exists already (an earlier export); pass --force to replace it"
    export(tmp_path / "b", out, force=True)
    assert {p.name for p in out.iterdir()} == EXPORT_FILES  # b's, whole: a's tokenizer went with a's export
    replaced = Samba.from_pretrained(out).state_dict()
    assert all(torch.equal(replaced[k], v) for k, v in b.state_dict().items())
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match=r"empty exists already \(empty\); pass --force"):
        export(tmp_path / "b", tmp_path / "empty")
    export(tmp_path / "b", tmp_path / "empty", force=True)

    def spoil(how):
        target = tmp_path / how
        shutil.copytree(out, target)
        if how == "notes":
            (target / "notes.txt").write_text("the user's")
        elif how == "subfolder":
            (target / "runs").mkdir()
        elif how == "samba model":
            shutil.rmtree(target)
            shutil.copytree(tmp_path / "a", target)  # config.json, model.safetensors, tokenizer.json
        elif how == "samba.json":
            (target / "samba.json").write_text("{}")
        elif how == "linked file":
            (target / "readout.safetensors").unlink()
            (target / "readout.safetensors").symlink_to(out / "readout.safetensors")
        elif how == "file":
            shutil.rmtree(target)
            target.write_text("a file")
        elif how == "link":
            shutil.rmtree(target)
            target.symlink_to(out)
        return target

    for how, why in [("notes", "it holds notes.txt, which export does not write"),
                     ("subfolder", "it holds runs/, which export does not write"),
                     ("samba model", "it has no readout.safetensors, samba.json"),
                     ("samba.json", "its samba.json is not an export's"),
                     ("linked file", "it holds readout.safetensors (a link), which export does not write"),
                     ("file", "a file"), ("link", "a symbolic link")]:
        target = spoil(how)
        before = _contents(tmp_path)
        for force in (True, False):
            with pytest.raises(ExportError) as refused:
                export(tmp_path / "b", target, force=force)
            assert str(refused.value) == (f"{target} exists and is not an earlier export ({why}); --force replaces "
                                          "only an earlier export: export to another folder"), how
        assert _contents(tmp_path) == before, how

    # the source model itself (an export is a source too), or a folder inside it
    exported = _contents(out)
    with pytest.raises(ExportError, match=f"^{re.escape(str(out))} is the source model; export to a folder outside"):
        export(out, out, force=True)
    with pytest.raises(ExportError, match=f"a/hf lies inside the source model {re.escape(str(tmp_path / 'a'))};"):
        export(tmp_path / "a", tmp_path / "a/hf", force=True)
    assert _contents(out) == exported and (_contents(tmp_path / "a"), _contents(tmp_path / "b")) == sources
