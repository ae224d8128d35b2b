"""The ``lab`` command.

lab list                              tracks and profiles
lab run pretrain [--profile cpu]      run one track (resumes an interrupted run; --fresh starts over)
lab run all [--profile cpu]           every available track
lab bench pretrain|finetune|capture   a benchmark: ratios against a baseline measured in the same run
lab transcoders build [--profile cpu] train the per-layer transcoders Track E's attribution graphs use
lab site build | serve                build the offline site into site/ (strict) or serve it
lab questions                         check that every ANSWERED question links to evidence that exists
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

from lab.errors import LabError

# `lab bench <name>`: the track that owns each benchmark's results, and the function that runs and writes it.
BENCHMARKS = {
    "pretrain": "lab.tracks.pretrain.run:benchmark",
    "finetune": "lab.tracks.A_finetuning.run:benchmark",
    "capture": "lab.tracks.C_probing.run:benchmark",
}


def _profile(name: str):
    """The profile, resolved once here at the edge, with its process settings applied."""
    from lab.profiles import activate, get_profile

    return activate(get_profile(name))


def _function(path: str):
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def _run(args: argparse.Namespace) -> None:
    from lab.tracks import TRACKS, get_track

    profile = _profile(args.profile)
    names = list(TRACKS) if args.track == "all" else [args.track]
    modules = [get_track(n) for n in names]  # validate every name before any compute
    for name, mod in zip(names, modules, strict=True):
        print(f"== track {name} (profile {profile.name}) ==", flush=True)
        t0 = time.perf_counter()
        summary = mod.run(profile, fresh=args.fresh)
        fields = summary.as_dict() if hasattr(summary, "as_dict") else summary
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
        print(f"== {name} done in {time.perf_counter() - t0:.0f} s: {shown}", flush=True)


def _site(args: argparse.Namespace) -> None:
    from lab.site import build as site

    if args.action == "build":
        print(f"site built into {site.build_site()}")
    else:
        site.serve_site(port=args.port)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ap = argparse.ArgumentParser(prog="lab", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="tracks and profiles")
    r = sub.add_parser("run", help="run a track, or all")
    r.add_argument("track")
    r.add_argument("--profile", default="cpu")
    r.add_argument("--fresh", action="store_true", help="ignore checkpoints of an interrupted run")
    b = sub.add_parser("bench", help="benchmarks")
    b.add_argument("which", choices=list(BENCHMARKS))
    b.add_argument("--profile", default="cpu")
    b.add_argument("--steps", type=int, default=None, help="timed steps (pretrain only; default 200)")
    t = sub.add_parser("transcoders", help="per-layer transcoders for circuit-tracer (Track E)")
    t.add_argument("action", choices=["build"])
    t.add_argument("--profile", default="cpu")
    t.add_argument("--fresh", action="store_true", help="retrain even if built (and ignore a build's checkpoint)")
    s = sub.add_parser("site", help="the offline site")
    s.add_argument("action", choices=["build", "serve"])
    s.add_argument("--port", type=int, default=8000)
    sub.add_parser("questions", help="check QUESTIONS.md evidence links")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "list":
            from lab.profiles import PROFILES
            from lab.tracks import TRACKS

            print("tracks:   " + ", ".join(TRACKS))
            for p in PROFILES.values():
                print(f"profile {p.name:<6} {p.description}")
        elif args.cmd == "run":
            _run(args)
        elif args.cmd == "bench":
            options = {"steps": args.steps} if args.steps is not None else {}
            _function(BENCHMARKS[args.which])(_profile(args.profile), **options)
        elif args.cmd == "transcoders":
            from lab.tracks.E_circuits.run import build_transcoders

            print(build_transcoders(_profile(args.profile), fresh=args.fresh))
        elif args.cmd == "site":
            _site(args)
        elif args.cmd == "questions":
            from lab.site.questions import check_evidence

            problems = check_evidence()
            for p in problems:
                print(p, file=sys.stderr)
            if problems:
                return 1
            print("QUESTIONS.md: every ANSWERED question links to evidence that exists")
    except LabError as e:
        print(f"lab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lab: interrupted — run the same command again to resume from the last checkpoint", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
