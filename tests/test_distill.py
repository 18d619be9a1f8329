"""Distillation from a teacher: the logged KL, the teacher's formats and refusals, and that the
term pulls the student towards the teacher."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from samba import Samba
from samba.config import ConfigError
from samba.data import TokenWindows, load_split
from samba.distill import Teacher
from samba.loss import samba_loss
from samba.model_files import CheckpointError
from samba.ops import linear_kl_divergence
from samba.train import train

from conftest import params_with, perturb_


def logged(where: Path, name: str) -> list[tuple[int, float]]:
    with open(where / "metrics/plots/metrics" / f"{name}.tsv") as f:
        return [(int(r["step"]), float(r[name.split("/")[-1]])) for r in csv.DictReader(f, delimiter="\t")]


def run(params, project: Path, where: Path) -> dict:
    return train(params, project / "data", project / "init", where / "out", where / "metrics", where / "ckpt")


def test_distill_is_zero_at_the_first_step_with_the_students_own_init_as_teacher(sources, project, tmp_path):
    params = params_with(sources, training={"max_steps": 3, "log_every": 1, "distill_weight": 1.5,
                                            "teacher": str(project / "init")})
    run(params, project, tmp_path)
    kl = logged(tmp_path, "train/distill")
    assert kl[0][0] == 1 and abs(kl[0][1]) < 1e-6
    assert kl[-1][1] > 1e-5  # once the student has moved, the teacher disagrees
    # the total holds the weighted terms: loss = main CE + readout CE + penalty + 1.5 KL, each weighted
    parts = {n: logged(tmp_path, f"train/{n}")[-1][1] for n in ("loss", "main_ce", "readout_ce", "penalty",
                                                                "distill")}
    t = params.training
    assert parts["loss"] == pytest.approx(parts["main_ce"] + t.readout_weight * parts["readout_ce"]
                                          + t.pruning_weight * parts["penalty"] + 1.5 * parts["distill"], rel=1e-5)


def test_no_teacher_logs_no_distillation(sources, project, tmp_path):
    run(params_with(sources, training={"max_steps": 2, "log_every": 1}), project, tmp_path)
    assert not (tmp_path / "metrics/plots/metrics/train/distill.tsv").exists()


def _val_kl(student_dir: Path, teacher: Samba, project: Path) -> float:
    student = Samba.from_pretrained(student_dir).eval()
    windows = TokenWindows.from_numpy(load_split(project / "data", "validation"), 32, torch.device("cpu"))
    inputs, _ = windows.batch(torch.arange(min(8, len(windows))))
    with torch.no_grad():
        s_chunks, t_chunks = student.chunk_outputs(inputs), teacher.chunk_outputs(inputs)
        return float(linear_kl_divergence(student.final_hidden(s_chunks), student.lm_head_weight,
                                          teacher.final_hidden(t_chunks), teacher.lm_head_weight))


def test_distillation_pulls_a_sparse_student_towards_its_teacher(sources, project, tmp_path):
    # the teacher: a dense fine-tune; the students: top-k 0.5 with and without the KL term
    dense = dict(max_steps=20, lr=1.0e-2)
    run(params_with(sources, training=dense), project, tmp_path / "teacher")
    teacher_dir = tmp_path / "teacher/out"
    for name, weight in (("plain", 0.0), ("distilled", 3.0)):
        run(params_with(sources, model={"sparsity_target": 0.5},
                        training={**dense, "distill_weight": weight, "teacher": str(teacher_dir)}),
            project, tmp_path / name)
    teacher = Samba.from_pretrained(teacher_dir).eval()
    plain, distilled = (_val_kl(tmp_path / n / "out", teacher, project) for n in ("plain", "distilled"))
    assert distilled < 0.7 * plain, (plain, distilled)


def test_a_mamba_checkpoint_can_teach(sources, project):
    # a transformers checkpoint: the teacher's readout (unused) is made to fit the student's layout
    params = params_with(sources)
    teacher = Teacher.load(sources / "mamba", params.model, "reference", torch.device("cpu"))
    ids = torch.randint(0, 264, (2, 9))
    hidden = teacher(ids)
    assert hidden.shape == (2, 9, params.model.d_model)
    assert not hidden.requires_grad and not any(p.requires_grad for p in teacher.model.parameters())
    student = Samba.from_pretrained(project / "init")  # converted from that same checkpoint
    same = samba_loss(student, ids, ids, 0.5, 0.5, "hoyer", teacher=teacher, distill_weight=1.0)
    assert abs(same.distill) < 1e-6
    perturb_(student, seed=3)
    parts = samba_loss(student, ids, ids, 0.5, 0.5, "hoyer", teacher=teacher, distill_weight=1.0)
    parts.total.backward()
    assert parts.distill > 1e-3
    assert all(p.grad is None for p in teacher.model.parameters())  # the teacher never learns


def test_bad_teachers_are_refused_naming_the_key(sources, project, tmp_path):
    params = params_with(sources, training={"distill_weight": 1.0, "teacher": str(tmp_path / "nowhere")})
    with pytest.raises(CheckpointError, match=r"training.teacher: .*nowhere is not a directory"):
        run(params, project, tmp_path)
    other_vocab = tmp_path / "other"
    shutil.copytree(sources / "mamba", other_vocab)
    config = json.loads((other_vocab / "config.json").read_text())
    from conftest import make_transformers_mamba

    make_transformers_mamba(vocab_size=config["vocab_size"] + 8).save_pretrained(other_vocab)
    params = params_with(sources, training={"distill_weight": 1.0, "teacher": str(other_vocab)})
    with pytest.raises(ConfigError, match=r"training.teacher: .* has a vocabulary of 272, the student 264"):
        run(params, project, tmp_path)
    with pytest.raises(ConfigError, match="training.distill_weight: must be >= 0"):
        params_with(sources, training={"distill_weight": -1.0})


def test_a_teacher_with_another_tokenizer_of_the_same_size_is_refused(sources, project, tmp_path):
    # a same-size vocabulary over other tokens: the KL would compare unrelated distributions
    from tokenizers import Tokenizer

    teacher = tmp_path / "teacher"
    shutil.copytree(project / "init", teacher)
    tok = Tokenizer.from_file(str(project / "data/tokenizer.json"))
    vocab = tok.get_vocab()
    a, b = sorted(vocab, key=vocab.get)[100:102]
    tok.save(str(teacher / "tokenizer.json"))
    swapped = json.loads((teacher / "tokenizer.json").read_text())
    swapped["model"]["vocab"][a], swapped["model"]["vocab"][b] = vocab[b], vocab[a]  # two ids swapped
    (teacher / "tokenizer.json").write_text(json.dumps(swapped))
    params = params_with(sources, training={"distill_weight": 1.0, "teacher": str(teacher), "max_steps": 2})
    with pytest.raises(ConfigError, match="training.teacher: .* records another tokenizer than the data's"):
        run(params, project, tmp_path / "refused")
    tok.save(str(teacher / "tokenizer.json"))  # the data's own tokenizer: accepted
    run(params, project, tmp_path / "accepted")


def test_a_run_shorter_than_the_sparsity_ramp_says_so(sources, project, tmp_path, caplog):
    params = params_with(sources, model={"sparsity_target": 0.5}, training={"max_steps": 4, "sparsity_warmup_steps": 100})
    with caplog.at_level("WARNING", logger="samba"):
        run(params, project, tmp_path)
    assert ("the sparsity ramp (100 steps) does not end before the run's last step (4 steps): training ends at a "
            "fraction of 0.015") in caplog.text


def _by_hand(student: Samba, teacher: Samba, inputs, targets, t) -> dict[str, torch.Tensor]:
    """The training loss from full logits, in fp64: CE(main) + readout_weight CE(readout) +
    pruning_weight Hoyer(chunk outputs) + distill_weight KL(teacher || student), the KL per
    token, sum over the vocabulary of p_t (log p_t - log p_s), averaged over tokens."""
    import torch.nn.functional as F

    out = student(inputs)
    with torch.no_grad():
        log_pt = teacher(inputs).logits.double().log_softmax(-1)
    log_ps = out.logits.double().log_softmax(-1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1).mean()
    main = F.cross_entropy(out.logits.double().flatten(0, 1), targets.flatten())
    readout = F.cross_entropy(out.readout_logits.double().flatten(0, 1), targets.flatten())
    hoyer = torch.stack([(c.double().abs().sum(-1) / (c.shape[-1] ** 0.5 * c.double().norm(dim=-1))).mean()
                         for c in out.chunk_outputs]).mean()  # dense: no top-k at target 0
    total = main + t.readout_weight * readout + t.pruning_weight * hoyer + t.distill_weight * kl
    return {"loss": total, "main_ce": main, "readout_ce": readout, "penalty": hoyer, "distill": kl}


def test_the_stage_trains_on_the_distillation_term_at_its_weight_by_hand(sources, project, tmp_path):
    # The logged loss of the first step against a hand calculation on the first batch at the init
    # weights, with a teacher that disagrees (the init moved off): a KL of order 1, not ~0.
    from samba.data import TokenWindows, load_split
    from samba.train import epoch_order

    teacher = Samba.from_pretrained(project / "init")
    perturb_(teacher, seed=3)
    teacher.save_pretrained(tmp_path / "teacher")
    params = params_with(sources, training={"max_steps": 1, "log_every": 1, "distill_weight": 2.5,
                                            "teacher": str(tmp_path / "teacher")})
    run(params, project, tmp_path)
    t = params.training
    windows = TokenWindows.from_numpy(load_split(project / "data", "train"), t.seq_len, torch.device("cpu"))
    _, order = epoch_order(t.seed, 0, len(windows.tokens), t.seq_len)
    student = Samba.from_pretrained(project / "init").train()
    with torch.no_grad():
        want = _by_hand(student, teacher.eval(), *windows.batch(order[:t.batch_size]), t)
    assert want["distill"] > 0.1
    for name, value in want.items():
        assert logged(tmp_path, f"train/{name}") == [(1, pytest.approx(float(value), rel=1e-5))], name


def test_the_distillation_terms_gradient_is_the_hand_losses(project):
    # the train stage's objective (train.training_objective) with a teacher: its total and the
    # total's gradient in every student parameter, against autograd through the hand loss
    from samba.config import TrainingConfig
    from samba.train import training_objective

    from conftest import relative_error

    student = Samba.from_pretrained(project / "init").train()
    perturb_(student, seed=4)
    teacher = Samba.from_pretrained(project / "init")
    perturb_(teacher, seed=5)
    t = TrainingConfig(readout_weight=0.5, pruning_weight=0.3, distill_weight=2.5)
    ids = torch.randint(0, student.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(6))
    total, _ = training_objective(student, t, Teacher(teacher))(ids[:, :-1], ids[:, 1:])
    total.backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad()
    want = _by_hand(student, teacher, ids[:, :-1], ids[:, 1:], t)
    assert float(want["distill"].detach()) > 0.1
    assert float(total.detach()) == pytest.approx(float(want["loss"].detach()), rel=1e-5)
    want["loss"].backward()
    for name, p in student.named_parameters():
        assert relative_error(grads[name].double(), p.grad.double()) < 1e-4, name
