"""The size of each run's update dW from ``relora analyze`` outputs: its Frobenius norm and its largest singular value.

    python docs/results/study/dw_norms.py ANALYZE_OUT [ANALYZE_OUT ...]

Each ANALYZE_OUT is a directory ``relora analyze RUNS --labels ... --out ANALYZE_OUT`` wrote; its ``spectra.json``
holds the singular values of dW = W - W_reference for every adapted matrix of every labelled run. Per label this
prints ||dW||_F over all matrices together (the square root of the sum of every squared singular value, which is
the Frobenius norm of all the dW stacked) and the largest singular value of any one matrix with its type. Rank says
how many directions an update uses; these say how far it moved, which the rank alone does not.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path


def norms(spectra: dict) -> dict[str, tuple[float, float, str]]:
    """{label: (Frobenius norm of all its dW, largest singular value, the matrix type that holds it)}."""
    out = {}
    for label, entry in spectra.items():
        total, top, where = 0.0, 0.0, ""
        for kind, matrices in entry["matrices"].items():
            for matrix in matrices:
                values = matrix["singular_values"]
                total += sum(s * s for s in values)
                if values and max(values) > top:
                    top, where = max(values), kind
        out[label] = (math.sqrt(total), top, where)
    return out


def main(argv: list[str]) -> None:
    if not argv:
        raise SystemExit(__doc__.split("\n\n")[1])
    print("| run | ||dW||_F, all matrices | largest singular value (matrix type) |")
    print("|---|---|---|")
    for out in argv:
        path = Path(out) / "spectra.json"
        if not path.is_file():
            raise SystemExit(f"dw_norms.py: error: {path} does not exist; pass a directory relora analyze wrote")
        for label, (frobenius, top, where) in norms(json.loads(path.read_text())).items():
            print(f"| {label} | {frobenius:.1f} | {top:.1f} ({where}) |")


if __name__ == "__main__":
    main(sys.argv[1:])
