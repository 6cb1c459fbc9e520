"""Writing a benchmark's JSON result file."""
from __future__ import annotations

import json
from pathlib import Path


def write_results(path, results: dict) -> Path:
    """Write `results` as indented JSON to `path` (folders made as needed) and say so."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    return out
