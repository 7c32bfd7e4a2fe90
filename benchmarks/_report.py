"""What every benchmark does with its results: print them, and write them as JSON when asked."""
from __future__ import annotations

import json
from pathlib import Path


def emit(res: dict, path=None) -> dict:
    print(json.dumps(res, indent=2))
    if path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res, indent=2) + "\n")
    return res
