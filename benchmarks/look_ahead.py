"""What look-ahead does: images per second with ``performance.look_ahead`` off and on, same
run, and how long the claim and prompt encoding it moves into the last step take.

    python benchmarks/look_ahead.py                     # tiny model, CPU, 64²
    python benchmarks/look_ahead.py --arch sd15 --full-size --device cuda --size 512 \
        --steps 30 --jobs 64 --batch 8

Rounds alternate look-ahead off and on (``_rounds``). On a GPU the claim and the encoding
run while the device finishes the last step and decodes, so the rate should rise by their
share of a batch; on a CPU nothing runs meanwhile (the device is the CPU), so the rates
should match: that run shows the cost is nil and how much time would be hidden. Prints a
Markdown table and writes JSON (--out).
"""

from __future__ import annotations

import argparse

from _rounds import add_arguments, alternate, finish, median, one_round


def looked_ahead(daemon) -> dict:
    worker = daemon.supervisor.workers[0]
    batches = worker.looked_ahead
    seconds = worker.look_ahead_seconds
    return {
        "batches_claimed_ahead": batches,
        "ms_per_claim_ahead": round(1000 * seconds / batches, 2) if batches else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser)
    parser.set_defaults(steps=4, jobs=32)
    args = parser.parse_args()

    def round_for(model, workdir, ahead):
        sections = {"performance": {"look_ahead": ahead}}
        result = one_round(model, workdir, args, sections, inspect=looked_ahead)
        result["images_per_second"] = args.jobs / result["seconds"]
        return {"look_ahead": ahead, **result}

    rounds = alternate(args, [False, True], round_for)
    off = median([r for r in rounds if not r["look_ahead"]], "images_per_second")
    summary = []
    for ahead in (False, True):
        mine = [r for r in rounds if r["look_ahead"] is ahead]
        rate = median(mine, "images_per_second")
        claims = [r["ms_per_claim_ahead"] for r in mine if r["ms_per_claim_ahead"] is not None]
        summary.append(
            {
                "look_ahead": ahead,
                "images_per_second": round(rate, 2),
                "vs_off": round(rate / off, 3),
                "spread": [
                    round(min(r["images_per_second"] for r in mine), 2),
                    round(max(r["images_per_second"] for r in mine), 2),
                ],
                "ms_per_claim_ahead": round(sorted(claims)[len(claims) // 2], 2)
                if claims
                else None,
            }
        )
    finish(
        args,
        rounds,
        summary,
        ["look_ahead", "images/s (median)", "vs off", "spread", "claim + encode ahead, ms"],
        lambda row: [
            "on" if row["look_ahead"] else "off",
            row["images_per_second"],
            f"{row['vs_off']:.3f}",
            "–".join(str(v) for v in row["spread"]),
            "—" if row["ms_per_claim_ahead"] is None else f"{row['ms_per_claim_ahead']:g}",
        ],
    )


if __name__ == "__main__":
    main()
