"""An HTML page template for ``dvc plots show`` / ``dvc plots diff`` that renders offline.

DVC's renderer (dvc-render) fills a page's ``{scripts}`` placeholder with ``<script src=
"https://cdn.jsdelivr.net/npm/vega@...">`` tags (vega, vega-lite, vega-embed), so on a machine
without network the charts stay blank. The template built here has no ``{scripts}``
placeholder; it carries those three libraries inline instead, taken from the npm registry's
packages of exactly the versions dvc-render names (``npm pack``). ``.dvc/config`` points DVC at
it (``plots.html_template``), so every ``dvc plots show`` and ``dvc plots diff`` page works
offline.

    python -m samba.plots_template .dvc/plots/offline.html   # rebuild; needs npm and its registry
"""

from __future__ import annotations

import argparse
import hashlib
import re
import subprocess
import tarfile
import tempfile
from pathlib import Path

BUILDS = {"vega": "build/vega.min.js", "vega-lite": "build/vega-lite.min.js",
          "vega-embed": "build/vega-embed.min.js"}
PAGE = """<!DOCTYPE html>
<html>
<head>
    {{refresh_tag}}
    <title>DVC Plot</title>
    <meta charset="utf-8">
    <!-- vega, vega-lite and vega-embed inline ({provenance}), so that the page needs no network.
         Built by python -m samba.plots_template; dvc-render's scripts placeholder is left out on purpose. -->
{scripts}
    <style>
        table {{
            border-spacing: 15px;
        }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""


def expected_versions() -> dict[str, str]:
    """The versions dvc-render's pages load from the CDN: {package: version}."""
    from dvc_render.vega import VegaRenderer

    found = dict(re.findall(r"npm/([\w-]+)@([\d.]+)", VegaRenderer.SCRIPTS))
    if set(found) != set(BUILDS):
        raise RuntimeError(f"dvc-render loads {found}; expected {sorted(BUILDS)}")
    return found


def fetch(package: str, version: str, workdir: Path) -> str:
    """The minified browser build of ``package@version``, from the npm registry's tarball."""
    out = subprocess.run(["npm", "pack", f"{package}@{version}", "--silent"], cwd=workdir, capture_output=True,
                         text=True, check=True).stdout.strip().splitlines()[-1]
    with tarfile.open(workdir / out) as tar:
        return tar.extractfile(f"package/{BUILDS[package]}").read().decode("utf-8")


def build(path: Path) -> None:
    versions = expected_versions()
    scripts, provenance = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for package, version in versions.items():
            js = fetch(package, version, Path(tmp))
            if "</script" in js.lower() or re.search(r"\{(scripts|plot_divs|refresh_tag)\}", js):
                raise RuntimeError(f"{package}@{version} cannot be inlined as is")
            scripts.append(f"    <script>/* {package}@{version} {BUILDS[package]} */\n{js}\n    </script>")
            provenance.append(f"{package}@{version} sha256:{hashlib.sha256(js.encode()).hexdigest()[:16]}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(PAGE.format(scripts="\n".join(scripts), provenance=", ".join(provenance)), encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m samba.plots_template", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", default=".dvc/plots/offline.html")
    args = parser.parse_args(argv)
    build(Path(args.out))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
