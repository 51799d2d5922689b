"""Online EM (``partial_fit``) against batch EM on the same rows: held-out log-likelihood gap.

    python bench/bench_online.py

A known mixture (four full-covariance components in 3-D, two overlapping; the
one of tests/test_online.py) is streamed as 200 batches of 2,000 rows and as 40
batches of 20,000 rows. For each covariance type, a model learnt by one
``partial_fit`` per batch and one fitted by batch EM on all the rows of that
stream are scored on 50,000 held-out rows; the table gives the online model's
gap in percent of the batch model's mean log-likelihood (negative: worse).
"""

from __future__ import annotations

import argparse

import numpy as np

from dgmm import GaussianMixture
from dgmm.datasets import correlated_mixture as draw

N_COMPONENTS = 4


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--streams", default="200x2000,40x20000", help="batches x rows, comma-separated")
    args = parser.parse_args()
    held_out = draw(50_000, np.random.default_rng(1))
    print("| stream | full | tied | diag | spherical |")
    print("|---|---|---|---|---|")
    for spec in args.streams.split(","):
        n_batches, rows = (int(v) for v in spec.split("x"))
        rng = np.random.default_rng(2)
        stream = [draw(rows, rng) for _ in range(n_batches)]
        gaps = []
        for kind in ("full", "tied", "diag", "spherical"):
            online = GaussianMixture(N_COMPONENTS, covariance_type=kind, random_state=0)
            for batch in stream:
                online.partial_fit(batch)
            batch_em = GaussianMixture(N_COMPONENTS, covariance_type=kind, random_state=0).fit(np.concatenate(stream))
            a, b = online.score(held_out), batch_em.score(held_out)
            gaps.append(100 * (a - b) / abs(b))
        print(f"| {n_batches} × {rows:,} | " + " | ".join(f"{g:+.3f} %" for g in gaps) + " |")


if __name__ == "__main__":
    main()
