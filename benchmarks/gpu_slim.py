"""Which of .gpu/'s wheels the GPU machine does not need: it has the package already, in a version that meets
every requirement the carried wheels put on it (pip keeps an installed package that satisfies, so the wheel
would never be read). The machine's packages come from a session's `pip_list.txt` (gpu_session.sh writes it),
kept in benchmarks/gpu_machine_packages.txt; a call carries 64 MiB, the repository included.

    python3 benchmarks/gpu_slim.py benchmarks/gpu_machine_packages.txt .gpu/dvc   # removes them (gpu_prepare.sh)
    python3 benchmarks/gpu_slim.py --dry-run LIST DIR ...                          # only says which
    python3 benchmarks/gpu_slim.py LIST DIR --check PYTHON3.12 --require dvc==3.67.1 ...
        # then pip itself, on an interpreter like the machine's, installs --require from DIR with LIST installed (dry run)

Only folders pip installs with their requirements: .gpu/lmeval's lm-eval goes in without them.

Requirements are read from each wheel's METADATA, those of extras and of other Pythons or platforms left aside,
as pip on that machine (CPython 3.12, Linux x86_64) leaves them; a package a carried wheel asks for but that is neither carried nor on the machine
(or there in a version it refuses) is an error here, not on the GPU machine."""
import argparse
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name, parse_wheel_filename
    from packaging.version import Version
except ImportError:  # a bare python3 with pip: the same library, vendored
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name, parse_wheel_filename
    from pip._vendor.packaging.version import Version


# the GPU machine's interpreter (../shared/GPU.md), whatever runs this; "extra" set per requirement (followed)
MARKER_ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
              "platform_python_implementation": "CPython", "sys_platform": "linux", "platform_system": "Linux",
              "os_name": "posix", "platform_machine": "x86_64", "extra": ""}


def machine_packages(path: Path) -> dict:
    """`pip list --format=freeze` lines (name==version) as {canonical name: Version}."""
    have = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, version = line.partition("==")
        if not sep:
            raise ValueError(f"{path}:{n}: {line!r} is not name==version (pip list --format=freeze)")
        try:
            have[canonicalize_name(name)] = Version(version)
        except ValueError as err:  # packaging's InvalidVersion
            raise ValueError(f"{path}:{n}: {line!r}: {err}") from None
    if not have:
        raise ValueError(f"{path}: no packages in it (pip list --format=freeze of the GPU machine)")
    return have


def wheel_requirements(wheel: Path) -> list:
    """Its Requires-Dist, each with its marker (which extra, which Python or platform)."""
    try:
        with zipfile.ZipFile(wheel) as z:
            meta = next((n for n in z.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1), None)
            text = None if meta is None else z.read(meta).decode()
    except zipfile.BadZipFile as err:
        raise ValueError(f"{wheel}: not a wheel ({err})") from None
    if text is None:
        raise ValueError(f"{wheel}: no .dist-info/METADATA")
    head = text.replace("\r\n", "\n").split("\n\n", 1)[0]  # the headers; the description follows the first blank line
    return [Requirement(line.split(":", 1)[1].strip()) for line in head.splitlines() if line.startswith("Requires-Dist:")]


def followed(req, extras) -> bool:
    """Does pip on the GPU machine follow this requirement, with these extras of its package asked for."""
    return req.marker is None or any(req.marker.evaluate({**MARKER_ENV, "extra": e}) for e in ("", *extras))


def unneeded(have: dict, dirs) -> list:
    """The wheels in dirs whose package the machine has in a version every carried wheel's requirement accepts."""
    wheels = {}
    for d in dirs:
        if not Path(d).is_dir():
            raise ValueError(f"{d}: no such folder")
        for w in sorted(Path(d).glob("*.whl")):
            wheels[canonicalize_name(parse_wheel_filename(w.name)[0])] = w
    requires = {name: wheel_requirements(w) for name, w in wheels.items()}  # each wheel read once
    extras = {name: set() for name in wheels}  # the extras of each carried package that some requirement asks for
    while True:  # until no requirement asks for an extra not yet followed (fsspec[http] brings aiohttp's)
        wanted = {}  # canonical name: the requirements the carried wheels put on it
        for name, reqs in requires.items():
            for req in reqs:
                if followed(req, extras[name]):
                    wanted.setdefault(canonicalize_name(req.name), []).append(req)
        more = {(n, e) for n, reqs in wanted.items() if n in wheels for r in reqs for e in r.extras if e not in extras[n]}
        if not more:
            break
        for n, e in more:
            extras[n].add(e)
    missing = sorted(n for n in wanted if n not in wheels and n not in have)
    if missing:
        raise ValueError(f"required by a carried wheel, neither carried nor on the machine: {', '.join(missing)}")

    def accepted(n):  # the machine's version of n meets every carried requirement on it (pip keeps a prerelease too)
        return all(r.specifier.contains(have[n], prereleases=True) for r in wanted.get(n, []))

    old = sorted(f"{n} {have[n]} ({'; '.join(str(r) for r in wanted[n])})" for n in wanted
                 if n not in wheels and not accepted(n))
    if old:
        raise ValueError(f"required by a carried wheel, not carried, on the machine in a version refused: {', '.join(old)}")
    return [w for name, w in wheels.items() if name in have and accepted(name)]


def install_check(python, have: dict, dirs, requires) -> list:
    """pip's own resolver where unneeded() is a reading of it: a bare venv of `python` (the machine's Python version)
    whose installed packages are `have` (a dist-info each, no code), installing `requires` from dirs' wheels alone,
    no configuration (this machine's pip.conf adds wheel folders). Returns what pip would install (name-version);
    ValueError with pip's errors if it cannot."""
    with tempfile.TemporaryDirectory() as tmp:
        site = Path(tmp, "site")
        for name, version in have.items():
            info = site / f"{name.replace('-', '_')}-{version}.dist-info"
            info.mkdir(parents=True)
            (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        venv = Path(tmp, "venv")
        made = subprocess.run([str(python), "-m", "venv", "--without-pip", str(venv)], capture_output=True, text=True)
        if made.returncode:
            raise ValueError(f"{python}: no venv made ({' '.join(made.stderr.split())[-300:]})")
        env = {"PATH": os.environ.get("PATH", ""), "HOME": tmp, "PIP_CONFIG_FILE": os.devnull, "PYTHONPATH": str(site)}
        links = [a for d in dirs for a in ("--find-links", str(d))]
        proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
                               "--dry-run", "--no-index", "--disable-pip-version-check", *links, *requires],
                              env=env, capture_output=True, text=True)
    if proc.returncode:
        errors = [line for line in proc.stderr.splitlines() if line.startswith("ERROR")] or proc.stderr.splitlines()[-3:]
        raise ValueError(f"pip would not install {' '.join(requires)} on {python} from {', '.join(map(str, dirs))}: "
                         + " / ".join(errors))
    said = next((line for line in proc.stdout.splitlines() if line.startswith("Would install ")), "")
    return said.split()[2:]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("packages", type=Path, help="the machine's packages, name==version a line")
    ap.add_argument("dirs", nargs="+", type=Path, help="folders of wheels carried together")
    ap.add_argument("--dry-run", action="store_true", help="say which, remove none")
    ap.add_argument("--check", metavar="PYTHON", help="then let pip, run by this interpreter (the machine's Python "
                    "version), install --require from what is left (a dry run; the wheels of dirs alone)")
    ap.add_argument("--require", action="append", default=[], help="what the machine installs from dirs (repeat)")
    args = ap.parse_args(argv)
    if bool(args.check) != bool(args.require):
        ap.error("--check and --require go together")
    if args.check and args.dry_run:
        ap.error("--check reads the folders as left: not with --dry-run")
    try:
        have = machine_packages(args.packages)
        drop = unneeded(have, args.dirs)
    except (OSError, ValueError) as err:  # a missing or malformed list, a folder that is not there, a bad wheel
        sys.exit(f"gpu_slim: {err}")
    size = sum(w.stat().st_size for w in drop)
    for w in drop:
        print(f"gpu_slim: the machine has {w.name.split('-')[0]}: {w}")
        if not args.dry_run:
            w.unlink()
    print(f"gpu_slim: {len(drop)} wheels, {size / 2**20:.1f} MiB, {'would be left' if args.dry_run else 'left'} out")
    if args.check:
        try:
            installs = install_check(args.check, have, args.dirs, args.require)
        except (OSError, ValueError) as err:
            sys.exit(f"gpu_slim: {err}")
        asked = {canonicalize_name(Requirement(r).name) for r in args.require}
        named = [i for i in installs if canonicalize_name(i.rsplit("-", 1)[0]) in asked]
        print(f"gpu_slim: pip on {args.check}, with the machine's packages installed, would install "
              f"{' '.join(named) or 'nothing asked for'} and {len(installs) - len(named)} more from what is left")


if __name__ == "__main__":
    sys.exit(main())
