"""Export to transformers and recurrent generation, against transformers and the full forward."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from samba import Samba
from samba.config import Params
from samba.convert import convert
from samba.data import prepare_tokens
from samba.export import ExportError, export
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


def test_export_refuses_sparsity_unless_dropped_and_says_what_it_costs(sources, tmp_path):
    params = Params.from_dict(tiny_params(sources), require_all=True)
    prepare_tokens(params.dataset, tmp_path / "data")
    convert(params, tmp_path / "init")
    model = Samba.from_pretrained(tmp_path / "init")
    model.set_sparsity_target(0.75)
    model.save_pretrained(tmp_path / "sparse")
    with pytest.raises(ExportError, match=r"zeroes 75% of every chunk output .* plain Mamba cannot compute "
                                          r"\(test ppl [\d.]+ with it, [\d.]+ without, .*--drop-sparsity"):
        export(tmp_path / "sparse", tmp_path / "hf", data_dir=tmp_path / "data")
    assert not (tmp_path / "hf").exists()
    report = export(tmp_path / "sparse", tmp_path / "hf", drop_sparsity=True, data_dir=tmp_path / "data")
    assert report["ppl_with_sparsity"] != report["ppl_without"]
    assert Samba.from_pretrained(tmp_path / "hf").config.sparsity_target == 0.75  # Samba's own config kept


# ----------------------------------------------------------------------------- the command line

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


def test_generate_says_there_is_no_model_where_there_is_none(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "samba.generate", str(tmp_path / "nonexistent"), "--prompt", "x"],
                          capture_output=True, text=True, env=tool_env())
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == (f"[generate] error: {tmp_path / 'nonexistent'}: no model there; run the train stage "
                           "first (dvc repro train)\n")


def test_export_command_refuses_in_one_line(project, tmp_path):
    model = tiny_samba()
    model.set_sparsity_target(0.5)
    model.save_pretrained(tmp_path / "sparse")
    proc = subprocess.run([sys.executable, "-m", "samba.export", str(tmp_path / "sparse"), str(tmp_path / "hf"),
                           "--data", str(project / "data")], capture_output=True, text=True, env=tool_env())
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr  # the cost measured, quietly
    assert re.fullmatch(r"\[export\] error: .* \(test ppl [\d.]+ with it, [\d.]+ without, .*--drop-sparsity .*\n",
                        proc.stderr), proc.stderr
    ok = subprocess.run([sys.executable, "-m", "samba.export", str(tmp_path / "sparse"), str(tmp_path / "hf"),
                         "--drop-sparsity"], capture_output=True, text=True, env=tool_env())
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "hf/config.json").is_file() and (tmp_path / "hf/readout.safetensors").is_file()


def test_export_refuses_to_replace_a_directory_unless_forced(tmp_path):
    tiny_samba().save_pretrained(tmp_path / "samba")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf/mine.txt").write_text("the user's")
    command = [sys.executable, "-m", "samba.export", str(tmp_path / "samba"), str(tmp_path / "hf")]
    proc = subprocess.run(command, capture_output=True, text=True, env=tool_env())
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == f"[export] error: {tmp_path / 'hf'} exists already; pass --force to replace it\n"
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["mine.txt"]
    forced = subprocess.run(command + ["--force"], capture_output=True, text=True, env=tool_env())
    assert forced.returncode == 0, forced.stderr
    assert (tmp_path / "hf/config.json").is_file() and not (tmp_path / "hf/mine.txt").exists()
