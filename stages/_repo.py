"""Put this repository's ``src/`` first on the import path, so that a stage runs the code of
the copy it belongs to (a ``dvc exp run --temp`` or ``--queue`` workspace, a clone), which is
the code DVC hashed for it, and never another checkout's installed ``samba``."""

import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
if str(SRC) not in sys.path[:1]:
    sys.path.insert(0, str(SRC))
