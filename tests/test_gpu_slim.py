"""benchmarks/gpu_slim.py: a wheel stays out of a GPU call only where the machine's own version of its package meets
every requirement the carried wheels put on it (pip keeps that one, so the wheel would never be read)."""
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SLIM = ROOT / "benchmarks" / "gpu_slim.py"


def wheel(d: Path, name: str, version: str, *requires: str) -> Path:
    """A wheel file with only its METADATA and WHEEL: what gpu_slim and pip's resolver read."""
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"  # as wheel files spell a name
    meta = [f"Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    meta += [f"Requires-Dist: {r}" for r in requires]
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name.replace('-', '_')}-{version}.dist-info/METADATA", "\n".join(meta) + "\n\nRequires-Dist: not-a-header\n")
        z.writestr(f"{name.replace('-', '_')}-{version}.dist-info/WHEEL",  # pip's resolver (--check) reads it too
                   "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
    return path


def slim(tmp_path, packages: str, *dirs, dry=False):
    listing = tmp_path / "packages.txt"
    listing.write_text(packages)
    args = [sys.executable, str(SLIM), *(["--dry-run"] if dry else []), str(listing), *map(str, dirs)]
    return subprocess.run(args, capture_output=True, text=True, timeout=60)


def left(d: Path):
    return sorted(p.name.split("-")[0] for p in d.glob("*.whl"))


def test_only_what_the_machine_has_in_an_accepted_version_is_left_out(tmp_path):
    d = tmp_path / "dvc"
    wheel(d, "dvc", "3.67.1", "rich>=14", "attrs>=22", "Click>=8.5", "tqdm<5,>=4.63")
    wheel(d, "rich", "15.0.0", "pygments>=2.13")
    wheel(d, "pygments", "2.21.0")
    wheel(d, "attrs", "26.1.0")
    wheel(d, "click", "8.5.1")
    wheel(d, "tqdm", "4.70.1")
    # the machine: rich and pygments as wanted (a name spelt otherwise), attrs too old, click older but accepted,
    # tqdm not there
    proc = slim(tmp_path, "# a comment\nRich==15.0.0\nPygments==2.21.0\nattrs==21.4.0\nclick==8.5.0\nnumpy==2.3.0\n", d)
    assert proc.returncode == 0, proc.stderr
    assert left(d) == ["attrs", "dvc", "tqdm"]
    assert "3 wheels" in proc.stdout and "left out" in proc.stdout


def test_a_requirement_of_an_extra_or_another_platform_does_not_keep_a_wheel(tmp_path):
    d = tmp_path / "w"
    wheel(d, "dvc", "3.67.1", "rich>=14", 'rich>=99; extra == "tests"', 'rich>=99; python_version < "3.10"',
          'boto3; extra == "s3"', 'pywin32; sys_platform == "win32"')
    wheel(d, "rich", "15.0.0")
    proc = slim(tmp_path, "rich==15.0.0\n", d)
    assert proc.returncode == 0, proc.stderr
    assert left(d) == ["dvc"]


def test_an_extra_a_carried_wheel_asks_for_is_followed(tmp_path):
    """dvc-http asks for fsspec[http]: what fsspec's http extra needs counts (aiohttp, here too old on the machine)."""
    d = tmp_path / "w"
    wheel(d, "dvc-http", "2.32.0", "fsspec[http]>=2024")
    wheel(d, "fsspec", "2025.1.0", 'aiohttp>=3.13; extra == "http"', 'boto3; extra == "s3"')
    wheel(d, "aiohttp", "3.14.5")
    proc = slim(tmp_path, "fsspec==2025.1.0\naiohttp==3.9.0\n", d)
    assert proc.returncode == 0, proc.stderr  # boto3 (the s3 extra, asked for by nobody) is not missing
    assert left(d) == ["aiohttp", "dvc_http"]


def test_a_requirement_of_this_python_keeps_a_wheel(tmp_path):
    d = tmp_path / "w"
    wheel(d, "dvc", "3.67.1", 'rich>=15; python_version >= "3.12"')
    wheel(d, "rich", "15.0.0")
    assert slim(tmp_path, "rich==14.0.0\n", d).returncode == 0
    assert left(d) == ["dvc", "rich"]


def test_requirements_across_folders_are_counted_together(tmp_path):
    wheel(tmp_path / "a", "dvc", "3.67.1", "urllib3>=2.8")
    wheel(tmp_path / "b", "urllib3", "2.8.0")
    assert slim(tmp_path, "urllib3==2.7.0\n", tmp_path / "a", tmp_path / "b").returncode == 0
    assert left(tmp_path / "b") == ["urllib3"]


def test_dry_run_removes_nothing_and_says_how_much(tmp_path):
    d = tmp_path / "w"
    wheel(d, "dvc", "3.67.1", "six")
    six = wheel(d, "six", "1.17.0")
    proc = slim(tmp_path, "six==1.17.0\n", d, dry=True)
    assert proc.returncode == 0, proc.stderr
    assert six.exists() and f"the machine has six: {six}" in proc.stdout
    assert "1 wheels, 0.0 MiB, would be left out" in proc.stdout


def test_a_requirement_nobody_provides_is_an_error_here(tmp_path):
    d = tmp_path / "w"
    wheel(d, "dvc", "3.67.1", "dvc-data>=3", "six")
    six = wheel(d, "six", "1.17.0")
    proc = slim(tmp_path, "six==1.17.0\n", d)
    assert proc.returncode != 0 and "gpu_slim: required by a carried wheel, neither carried nor on the machine: dvc-data" \
        in proc.stderr and "Traceback" not in proc.stderr
    assert six.exists()  # nothing removed


@pytest.mark.parametrize("line", ["six 1.17.0", "six>=1"])
def test_a_package_list_not_in_freeze_form_is_refused(tmp_path, line):
    d = tmp_path / "w"
    six = wheel(d, "six", "1.17.0")
    proc = slim(tmp_path, f"# the machine\n{line}\n", d)
    assert proc.returncode != 0 and f"packages.txt:2: {line!r} is not name==version" in proc.stderr
    assert "Traceback" not in proc.stderr and six.exists()


@pytest.mark.parametrize("text, said", [("requests===2.3\n", "packages.txt:1: 'requests===2.3'"),
                                         ("# only a comment\n", "packages.txt: no packages in it")])
def test_a_bad_version_or_an_empty_list_is_refused_by_line(tmp_path, text, said):
    d = tmp_path / "w"
    wheel(d, "six", "1.17.0")
    proc = slim(tmp_path, text, d)
    assert proc.returncode != 0 and said in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_a_file_that_is_no_wheel_is_named(tmp_path):
    d = tmp_path / "w"
    wheel(d, "six", "1.17.0")
    (d / "broken-1.0-py3-none-any.whl").write_bytes(b"not a zip")
    proc = slim(tmp_path, "six==1.17.0\n", d)
    assert proc.returncode != 0 and "broken-1.0-py3-none-any.whl: not a wheel" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_list_or_folder_that_is_not_there_is_refused_by_name(tmp_path):
    d = tmp_path / "w"
    six = wheel(d, "six", "1.17.0")
    proc = subprocess.run([sys.executable, str(SLIM), str(tmp_path / "nope.txt"), str(d)], capture_output=True, text=True)
    assert proc.returncode != 0 and "nope.txt" in proc.stderr and "Traceback" not in proc.stderr
    proc = slim(tmp_path, "six==1.17.0\n", d, tmp_path / "gone")
    assert proc.returncode != 0 and f"gpu_slim: {tmp_path / 'gone'}: no such folder" in proc.stderr
    assert "Traceback" not in proc.stderr and six.exists()


def test_the_committed_machine_list_leaves_dvc_and_dvclive_carried(tmp_path):
    """The list gpu_prepare reads is in freeze form and has neither dvc nor dvclive (they must be carried)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_slim
    finally:
        sys.path.pop(0)
    have = gpu_slim.machine_packages(ROOT / "benchmarks" / "gpu_machine_packages.txt")
    assert "torch" in have and "dvc" not in have and "dvclive" not in have and "lm-eval" not in have


@pytest.mark.parametrize("order", [("a", "b", "c"), ("c", "b", "a")])
def test_every_requirer_counts_whatever_the_order(tmp_path, order):
    d = tmp_path / "w"
    for name, spec in zip(order, ("x>=1", "x>=3", "x>=1")):
        wheel(d, name, "1.0", spec)
    wheel(d, "x", "3.0")
    assert slim(tmp_path, "x==2.0\na==1.0\nb==1.0\nc==1.0\n", d).returncode == 0
    assert "x" in left(d)  # 2.0 meets x>=1 twice, not x>=3


@pytest.mark.parametrize("have", ["5.0.0", "4.0.0"])
def test_every_clause_of_a_specifier_counts(tmp_path, have):
    d = tmp_path / "w"
    wheel(d, "dvc", "1.0", "tqdm<5,>=4.63")
    wheel(d, "tqdm", "4.70.1")
    assert slim(tmp_path, f"tqdm=={have}\n", d).returncode == 0
    assert left(d) == ["dvc", "tqdm"]


def test_an_installed_prerelease_is_accepted_as_pip_keeps_it(tmp_path):
    d = tmp_path / "w"
    wheel(d, "dvc", "1.0", "six>=1")
    wheel(d, "six", "1.17.0")
    assert slim(tmp_path, "six==2.0.0rc1\n", d).returncode == 0
    assert left(d) == ["dvc"]


def test_names_spelt_otherwise_are_one_package(tmp_path):
    d = tmp_path / "w"
    wheel(d, "dvc", "1.0", "Typing.Extensions>=4", "ML-Dtypes")
    wheel(d, "typing_extensions", "4.16.0")
    proc = slim(tmp_path, "typing_extensions==4.16.0\nml_dtypes==0.5.0\n", d)
    assert proc.returncode == 0, proc.stderr
    assert left(d) == ["dvc"]


def test_a_requirement_only_the_machine_has_is_not_missing(tmp_path):
    d = tmp_path / "w"
    wheel(d, "dvc", "1.0", "numpy>=2")
    proc = slim(tmp_path, "numpy==2.3.0\n", d)
    assert proc.returncode == 0, proc.stderr


def test_requirements_of_another_machine_or_interpreter_are_left_aside(tmp_path):
    d = tmp_path / "w"
    wheel(d, "dvc", "1.0", 'armonly; platform_machine == "aarch64"', 'pypyonly; implementation_name == "pypy"',
          'x86>=1; platform_machine == "x86_64"')
    wheel(d, "x86", "1.0")
    proc = slim(tmp_path, "x86==0.1\n", d)
    assert proc.returncode == 0, proc.stderr  # armonly and pypyonly are not missing
    assert left(d) == ["dvc", "x86"]  # 0.1 does not meet x86>=1


def test_the_size_said_is_the_wheels(tmp_path):
    d = tmp_path / "w"
    wheel(d, "dvc", "1.0", "six")
    six = wheel(d, "six", "1.17.0")
    with zipfile.ZipFile(six, "a") as z:  # stored: the file grows by the MiB
        z.writestr("pad.bin", b"\0" * (1 << 20))
    proc = slim(tmp_path, "six==1.17.0\n", d, dry=True)
    assert "1 wheels, 1.0 MiB, would be left out" in proc.stdout, proc.stdout


def test_a_blank_line_in_the_list_is_skipped(tmp_path):
    d = tmp_path / "w"
    wheel(d, "six", "1.0")
    assert slim(tmp_path, "six==1.0\n\nnumpy==2.0\n", d).returncode == 0


def test_only_the_wheels_own_metadata_is_read(tmp_path):
    d = tmp_path / "w"
    d.mkdir()
    with zipfile.ZipFile(d / "dvc-1.0-py3-none-any.whl", "w") as z:  # a vendored package's first
        z.writestr("vendored/x-1.0.dist-info/METADATA", "Name: x\nRequires-Dist: nothere\n")
        z.writestr("dvc-1.0.dist-info/METADATA", "Name: dvc\nVersion: 1.0\n")
    proc = slim(tmp_path, "six==1.0\n", d)
    assert proc.returncode == 0, proc.stderr


# --check: pip itself, on this interpreter, with the machine's list installed (its wheels here are py3-none-any)
def check(tmp_path, packages: str, d: Path, *require):
    listing = tmp_path / "packages.txt"
    listing.write_text(packages)
    args = [sys.executable, str(SLIM), str(listing), str(d), "--check", sys.executable]
    args += [a for r in require for a in ("--require", r)]
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


def test_pip_installs_what_is_left_beside_the_machines_packages(tmp_path):
    d = tmp_path / "dvc"
    wheel(d, "dvc", "3.67.1", "rich>=14", "tqdm>=4.63", "six")
    wheel(d, "rich", "15.0.0")
    wheel(d, "tqdm", "4.70.1")
    proc = check(tmp_path, "rich==15.0.0\nsix==1.17.0\n", d, "dvc==3.67.1")
    assert proc.returncode == 0, proc.stderr
    assert left(d) == ["dvc", "tqdm"]  # rich left out; six was never carried
    assert "would install dvc-3.67.1 and 1 more" in proc.stdout  # tqdm; "more" counts what was not asked for


def test_a_requirement_the_machine_has_is_not_counted_as_installed(tmp_path):
    d = tmp_path / "dvc"
    wheel(d, "dvc", "3.67.1", "tqdm>=4.63")
    wheel(d, "tqdm", "4.70.1")
    proc = check(tmp_path, "six==1.17.0\n", d, "dvc==3.67.1", "six==1.17.0")
    assert proc.returncode == 0, proc.stderr
    assert "would install dvc-3.67.1 and 1 more" in proc.stdout


def test_pip_refuses_a_carry_the_machine_could_not_install(tmp_path):
    """A --require that no carried wheel provides (dvclive): gpu_slim's reading of the wheels cannot see it, pip can."""
    d = tmp_path / "dvc"
    wheel(d, "dvc", "3.67.1", "tqdm>=4.63")
    wheel(d, "tqdm", "4.70.1")
    proc = check(tmp_path, "numpy==2.3.0\n", d, "dvc==3.67.1", "dvclive==3.49.1")
    assert proc.returncode != 0
    assert "pip would not install dvc==3.67.1 dvclive==3.49.1" in proc.stderr and "dvclive" in proc.stderr.split(":", 2)[2]
    assert "Traceback" not in proc.stderr


def test_pip_refuses_a_carried_wheel_in_a_version_its_requirer_refuses(tmp_path):
    """What gpu_slim's reading does not look at (a carried wheel's own version), pip does."""
    d = tmp_path / "dvc"
    wheel(d, "dvc", "3.67.1", "tqdm>=5")
    wheel(d, "tqdm", "4.70.1")
    proc = check(tmp_path, "numpy==2.3.0\n", d, "dvc==3.67.1")
    assert proc.returncode == 1 and "tqdm>=5" in proc.stderr and "pip would not install" in proc.stderr


def test_the_machines_version_refused_and_none_carried_is_an_error_here(tmp_path):
    d = tmp_path / "dvc"
    wheel(d, "dvc", "3.67.1", "tqdm>=4.63")
    wheel(d, "rich", "15.0.0", "tqdm<5")
    proc = slim(tmp_path, "tqdm==4.0.0\nrich==15.0.0\n", d)
    assert proc.returncode == 1 and "tqdm 4.0.0 (tqdm>=4.63; tqdm<5)" in proc.stderr
    assert left(d) == ["dvc", "rich"]


@pytest.mark.parametrize("extra", [["--check", sys.executable], ["--require", "dvc"],
                                   ["--check", sys.executable, "--require", "dvc", "--dry-run"]])
def test_check_wants_require_and_no_dry_run(tmp_path, extra):
    d = tmp_path / "dvc"
    wheel(d, "dvc", "3.67.1")
    (tmp_path / "packages.txt").write_text("six==1.17.0\n")
    proc = subprocess.run([sys.executable, str(SLIM), str(tmp_path / "packages.txt"), str(d), *extra],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--check" in proc.stderr and left(d) == ["dvc"]


def test_an_interpreter_that_does_not_run_is_named(tmp_path):
    d = tmp_path / "dvc"
    wheel(d, "dvc", "3.67.1")
    (tmp_path / "packages.txt").write_text("six==1.17.0\n")
    proc = subprocess.run([sys.executable, str(SLIM), str(tmp_path / "packages.txt"), str(d), "--check",
                           str(tmp_path / "python3.12"), "--require", "dvc"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "python3.12" in proc.stderr and "Traceback" not in proc.stderr


def test_pip_runs_without_configuration_or_index(tmp_path):
    """install_check's pip: no config file (PIP_CONFIG_FILE=os.devnull), --no-index, the fake site on PYTHONPATH."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("gpu_slim_under_test", SLIM)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    calls, real = [], subprocess.run
    mod.subprocess.run = lambda args, **kw: (calls.append((args, kw.get("env"))), real(args, **kw))[1]
    try:
        d = tmp_path / "dvc"
        wheel(d, "dvc", "3.67.1", "rich>=14")
        have = {"rich": mod.Version("15.0.0")}
        assert mod.install_check(sys.executable, have, [d], ["dvc==3.67.1"]) == ["dvc-3.67.1"]
    finally:
        mod.subprocess.run = real
    args, env = next((a, e) for a, e in calls if "pip" in a)
    assert "--no-index" in args and "--dry-run" in args
    import os
    assert env["PIP_CONFIG_FILE"] == os.devnull and "PYTHONPATH" in env


def test_a_pip_conf_of_the_venv_is_not_read(tmp_path):
    """A pip.conf pip would read (here the venv's own, sys.prefix/pip.conf, which pip --python runs in) that adds a
    wheel folder with dvclive must not let a carry without dvclive pass."""
    extra = tmp_path / "extra"
    wheel(extra, "dvclive", "3.49.1")
    py = tmp_path / "python3.12"  # makes its venv as python does, with a pip.conf in it
    py.write_text(f"#!/bin/sh\n{sys.executable} \"$@\" || exit\n"
                  f'[ "$1 $2" = "-m venv" ] && printf "[global]\\nfind-links = {extra}\\n" > "$4/pip.conf"\nexit 0\n')
    py.chmod(0o755)
    d = tmp_path / "dvc"
    wheel(d, "dvc", "3.67.1")
    listing = tmp_path / "packages.txt"
    listing.write_text("numpy==2.3.0\n")
    proc = subprocess.run([sys.executable, str(SLIM), str(listing), str(d), "--check", str(py),
                           "--require", "dvc==3.67.1", "--require", "dvclive==3.49.1"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1 and "pip would not install" in proc.stderr, proc.stdout + proc.stderr


def test_an_interpreter_that_makes_no_venv_is_named_with_its_error(tmp_path):
    py = tmp_path / "python3.12"
    py.write_text("#!/bin/sh\necho 'No module named venv' >&2; exit 1\n")
    py.chmod(0o755)
    d = tmp_path / "dvc"
    wheel(d, "dvc", "3.67.1")
    (tmp_path / "packages.txt").write_text("six==1.17.0\n")
    proc = subprocess.run([sys.executable, str(SLIM), str(tmp_path / "packages.txt"), str(d), "--check", str(py),
                           "--require", "dvc"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and f"{py}: no venv made (No module named venv)" in proc.stderr, proc.stderr


@pytest.mark.parametrize("extra, said", [(["--check", sys.executable], "--check and --require go together"),
                                         (["--require", "dvc"], "--check and --require go together"),
                                         (["--check", sys.executable, "--require", "dvc", "--dry-run"],
                                          "--check reads the folders as left: not with --dry-run")])
def test_check_refusals_say_why(tmp_path, extra, said):
    d = tmp_path / "dvc"
    wheel(d, "dvc", "3.67.1")
    (tmp_path / "packages.txt").write_text("six==1.17.0\n")
    proc = subprocess.run([sys.executable, str(SLIM), str(tmp_path / "packages.txt"), str(d), *extra],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and said in proc.stderr.splitlines()[-1], proc.stderr


@pytest.mark.skipif(sys.version_info[:3] == (3, 12, 3), reason="the marker below is gpu_slim's own interpreter")
def test_pip_checks_the_folder_as_slimmed(tmp_path):
    """rich's wheel goes (gpu_slim reads the machine as 3.12.3, where rich>=16 is not asked); pip on this interpreter
    asks rich>=16, which only the removed wheel had: the check must see the folder after the removal."""
    d = tmp_path / "dvc"
    wheel(d, "dvc", "3.67.1", "rich>=14", 'rich>=16; python_full_version != "3.12.3"')
    wheel(d, "rich", "16.0.0")
    proc = check(tmp_path, "rich==15.0.0\n", d, "dvc==3.67.1")
    assert left(d) == ["dvc"]
    assert proc.returncode == 1 and "pip would not install dvc==3.67.1" in proc.stderr, proc.stdout + proc.stderr


def test_a_prerelease_on_the_machine_is_accepted(tmp_path):
    d = tmp_path / "dvc"
    wheel(d, "dvc", "3.67.1", "tqdm>=4.63")
    proc = slim(tmp_path, "tqdm==5.0.0rc1\n", d)
    assert proc.returncode == 0, proc.stderr
