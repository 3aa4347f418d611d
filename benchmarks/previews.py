"""What live previews cost: denoising steps per second with previews off and on, same run.

    python benchmarks/previews.py                       # tiny model, CPU, 64²
    python benchmarks/previews.py --arch sd15 --full-size --device cuda --size 512 \
        --steps 30 --jobs 16 --batch 8

Rounds alternate ``previews.every_steps`` between 0 (off) and each value asked for
(``_rounds``). Someone must be listening for previews to be made and sent: each round
subscribes to the event stream and counts the previews it receives. Prints a Markdown table
and writes JSON (--out).
"""

from __future__ import annotations

import argparse

from _rounds import add_arguments, alternate, finish, median, one_round


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser)
    parser.add_argument("--every", default="5,1", help="previews.every_steps values to try")
    args = parser.parse_args()

    def round_for(model, workdir, every):
        sections = {"previews": {"every_steps": every}}
        result = one_round(model, workdir, args, sections, count="job.preview")
        return {"every_steps": every, **result}

    settings = [0, *(int(v) for v in args.every.split(","))]
    rounds = alternate(args, settings, round_for)
    off = median([r for r in rounds if r["every_steps"] == 0], "steps_per_second")
    summary = []
    for every in settings:
        mine = [r for r in rounds if r["every_steps"] == every]
        rate = median(mine, "steps_per_second")
        summary.append(
            {
                "every_steps": every,
                "steps_per_second": round(rate, 2),
                "vs_off": round(rate / off, 3),
                "previews_per_round": median(mine, "counted"),
            }
        )
    finish(
        args,
        rounds,
        summary,
        ["previews.every_steps", "steps/s (median)", "vs off", "previews per round"],
        lambda row: [
            "0 (off)" if row["every_steps"] == 0 else row["every_steps"],
            row["steps_per_second"],
            f"{row['vs_off']:.3f}",
            f"{row['previews_per_round']:g}",
        ],
    )


if __name__ == "__main__":
    main()
