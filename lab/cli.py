"""The ``lab`` command.

lab list [--profile cpu]              tracks: their results (commit, when, measured time), and the profiles
lab run pretrain [--profile cpu]      run one track (resumes an interrupted run, reuses a finished one; --fresh
                                      retrains); says what it reused, its headline numbers and where results went
lab run all [--profile cpu]           every available track
lab bench all                         the speed suite: every workload's fast path against today's baseline,
                                      written to results/bench/speed.parquet (`lab bench <workload>`: one row)
lab bench finetune|capture            instrumentation overhead (written to the owning track's results)
lab bench headlines --before COMMIT   each track's headline numbers then and now (results/bench/headlines)
lab transcoders build [--profile cpu] train the per-layer transcoders Track E's attribution graphs use
lab site build | serve                build the offline site into site/ (strict) or serve it
lab questions                         check that every ANSWERED question links to evidence that exists
"""

from __future__ import annotations

import argparse
import errno
import importlib
import inspect
import os
import sys
import time
from pathlib import Path

from lab.errors import LabError

# `lab bench <name>`: the track that owns each benchmark's results, and the function that runs and writes it.
BENCHMARKS = {
    "finetune": "lab.tracks.A_finetuning.run:benchmark",
    "capture": "lab.tracks.C_probing.run:benchmark",
}


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors (unknown flags, bad values) as one ``lab: error:`` line, exit status 2."""

    def error(self, message: str):
        self.exit(2, f"lab: error: {message}; see `{self.prog} --help`\n")


def _count(text: str) -> int:
    """An argparse type: an integer >= 1 (a step count)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1 (got {text!r})")
    return value


def _port(text: str) -> int:
    """An argparse type: a TCP port in 1..65535."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number in 1..65535 (got {text!r})")
    return value


# What to do about an everyday OS error; what is already written stays whole because every write is atomic.
_OS_HINTS = {
    errno.ENOSPC: "free some disk space and run the same command again (training resumes at its last checkpoint)",
    errno.EDQUOT: "free some of your disk quota and run the same command again",
    errno.EACCES: "check that path's permissions, or point LAB_RESULTS_DIR / LAB_DATA_DIR at a writable folder",
    errno.EPERM: "check that path's permissions, or point LAB_RESULTS_DIR / LAB_DATA_DIR at a writable folder",
    errno.EROFS: "that file system is read-only: point LAB_RESULTS_DIR / LAB_DATA_DIR at a writable folder",
    errno.EADDRINUSE: "that port is taken: choose another with --port",
}
_WRITES = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS)


def os_error_line(err: OSError) -> str:
    """One line for an :class:`OSError`: ``<path>: <reason>: <what to do>``, saying that nothing already written
    is lost when the error stopped a write."""
    from lab.paths import shown

    name = err.filename
    where = f"{shown(Path(os.fsdecode(name)))}: " if name and isinstance(name, str | bytes | os.PathLike) else ""
    reason = err.strerror or (str(err).strip().splitlines() or [type(err).__name__])[0]
    hint = _OS_HINTS.get(err.errno)
    if err.errno in _WRITES:
        hint += "; nothing already written is lost (every write is atomic)"
    return where + reason + (f": {hint}" if hint else "")


def _profile(name: str):
    """The profile, resolved once here at the edge, with its process settings applied."""
    from lab.profiles import activate, get_profile

    return activate(get_profile(name))


def _function(path: str):
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def _workloads() -> list[str]:
    from lab.bench.suite import WORKLOADS

    return list(WORKLOADS)


def _takes_steps(bench) -> bool:
    return "steps" in inspect.signature(bench).parameters


# ----------------------------------------------------------------------------- lab run: what happened, and where

SMALL_FILE = 1 << 20  # saved work up to this size is compared by content (a rewritten but identical config file)


def _saved_work(track: str, profile: str) -> tuple[list[Path], dict[str, tuple]]:
    """The track's own saved work (``.data/checkpoints/<profile>/<track>*``, ``.data/adapters/<profile>/<track>``)
    and a fingerprint of every file there and in the profile's transcoders (which Track E builds when missing):
    content for small files, size and modification time for large ones. Equal fingerprints before and after a run
    mean the run wrote and deleted nothing there: it trained nothing."""
    import hashlib

    from lab import paths

    checkpoints = paths.checkpoint_dir(profile, track).parent
    own = sorted(checkpoints.glob(f"{track}*")) + [paths.adapter_dir(profile, track, "x").parent]
    own = [f for f in own if f.is_dir() and any(p.is_file() for p in f.rglob("*"))]
    prints: dict[str, tuple] = {}
    for folder in [*own, paths.transcoder_dir(profile)]:
        for path in folder.rglob("*") if folder.is_dir() else ():
            if path.is_file():
                st = path.stat()
                small = st.st_size <= SMALL_FILE
                prints[str(path)] = (
                    (hashlib.sha256(path.read_bytes()).hexdigest(),)
                    if small
                    else (
                        st.st_size,
                        st.st_mtime_ns,
                    )
                )
    return own, prints


def _folders(folders: list[Path]) -> str:
    """``.data/checkpoints/smoke/{pretrain, pretrain-learned}``: folders, their common parent written once."""
    from lab.paths import shown

    by_parent: dict[str, list[str]] = {}
    for f in folders:
        by_parent.setdefault(shown(f.parent), []).append(f.name)
    return ", ".join(
        f"{parent}/{names[0]}" if len(names) == 1 else f"{parent}/{{{', '.join(names)}}}"
        for parent, names in by_parent.items()
    )


def _what_happened(track: str, profile: str, fresh: bool, before: tuple, after: tuple) -> tuple[bool, str]:
    """``(reused, sentence)``: whether the run reused finished work and trained nothing, said for a person."""

    (own_before, prints_before), (own_after, prints_after) = before, after
    where = _folders(own_after or own_before)
    again = f"`lab run {track}{'' if profile == 'cpu' else f' --profile {profile}'} --fresh`"
    if fresh:
        return False, f"retrained from scratch (--fresh); its work is saved in {where or 'no folder'}"
    if not own_before and not own_after:
        return False, f"{track} keeps no checkpoints: everything was computed again"
    if own_before and prints_before == prints_after:
        return True, (
            f"already complete: nothing was retrained, the finished work saved in {where} was reused\n"
            f"{again} retrains from scratch"
        )
    if not own_before:
        return False, f"trained from scratch; its work is saved in {where} (a second run reuses it)"
    return False, f"resumed: reused the work saved in {where} and trained what was missing\n{again} starts over"


def _written(track: str, profile: str, since: float) -> list[str]:
    """Where the run's results went: the folder and the files it wrote (from the track's manifest)."""
    from datetime import datetime

    from lab.paths import shown, track_results
    from lab.results import MANIFEST, read_manifest

    folder = track_results(track, profile)
    manifest = read_manifest(folder / MANIFEST) if (folder / MANIFEST).exists() else {}
    names = [
        n
        for n, r in sorted(manifest.items())
        if datetime.fromisoformat(r.get("written_at", "1970-01-01T00:00:00+00:00")).timestamp() >= since - 1
    ]
    if not names:
        return [f"results: none written to {shown(folder)}/"]
    files = [f for n in names for f in manifest[n]["files"]]
    charts = sum(f.endswith(".vl.json") for f in files)
    return [
        f"results: {shown(folder)}/ — {len(files) - charts} .parquet, {charts} charts (.vl.json), {MANIFEST}",
        f"         {', '.join(names)}; every summary number is in summary.parquet",
    ]


def _report(name: str, profile: str, summary, wall: float, happened: str, written: list[str]) -> str:
    """The few lines ``lab run`` ends a track with: time, what happened, the headline numbers, where results went."""
    from lab.notebook import duration, headline_rows
    from lab.tracks import headlines

    rows = headline_rows(summary, headlines()[name])
    width = max((len(q) for q, _, _ in rows), default=0)
    value_width = max((len(v) for _, v, _ in rows), default=0)
    lines = [f"== {name} done in {duration(wall)} (profile {profile}) =="]
    lines += [f"   {line}" for line in happened.splitlines()]
    lines += [f"   {q:<{width}}  {v:>{value_width}}  {m}".rstrip() for q, v, m in rows]
    lines += [f"   {line}" for line in written]
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> None:
    from lab.results import record_timing
    from lab.tracks import TRACKS, get_track

    profile = _profile(args.profile)
    names = list(TRACKS) if args.track == "all" else [args.track]
    modules = [get_track(n) for n in names]  # validate every name before any compute
    for name, mod in zip(names, modules, strict=True):
        print(f"== track {name} (profile {profile.name}) ==", flush=True)
        before, started = _saved_work(name, profile.name), time.time()
        t0 = time.perf_counter()
        summary = mod.run(profile, fresh=args.fresh)
        wall = time.perf_counter() - t0
        reused, happened = _what_happened(name, profile.name, args.fresh, before, _saved_work(name, profile.name))
        # under `accelerate launch`, one process records; a run that reused everything is not the track's time
        if int(os.environ.get("RANK", "0")) == 0 and not reused:
            record_timing(name, profile.name, wall)
        print(_report(name, profile.name, summary, wall, happened, _written(name, profile.name, started)), flush=True)


# ----------------------------------------------------------------------------- lab list


def _list(profile: str) -> str:
    """Each track's results for ``profile``: present or not, the commit and time that wrote them, and the time
    ``lab run`` measured (results/timings.parquet); then the profiles."""
    import polars as pl

    from lab.notebook import duration
    from lab.paths import results_root, shown, track_results
    from lab.profiles import PROFILES
    from lab.results import MANIFEST, TIMINGS, read_manifest
    from lab.tracks import TRACKS

    timings = {}
    if (results_root(profile) / TIMINGS).exists():
        try:
            rows = pl.read_parquet(results_root(profile) / TIMINGS).to_dicts()
            timings = {r["track"]: r for r in rows if r.get("profile", profile) == profile}
        except Exception:  # a damaged table: the times are unknown, the results are still listed
            timings = {}
    header = f"{'track':<14} {'results':<24} {'commit':<14} {'written (UTC)':<17} measured time"
    lines = [f"tracks, profile {profile} (results in {shown(results_root(profile))}/):", "  " + header]
    for track in TRACKS:
        folder = track_results(track, profile)
        try:
            manifest = read_manifest(folder / MANIFEST) if (folder / MANIFEST).exists() else {}
        except LabError:
            manifest = None
        if manifest is None:
            state, commit, when = "manifest unreadable", "", ""
        elif not manifest:
            state, commit, when = "none yet", "", ""
        else:
            missing = [f for r in manifest.values() for f in r["files"] if not (folder / f).exists()]
            state = f"{len(manifest)} results" + (f", {len(missing)} files missing" if missing else "")
            latest = max(manifest.values(), key=lambda r: r.get("written_at", ""))
            full = str(latest.get("git_commit", "unknown"))
            commit = full[:7] + ("+dirty" if full.endswith("+dirty") else "")
            when = latest.get("written_at", "")[:16].replace("T", " ")
        timing = timings.get(track)
        measured = duration(timing["wall_s"]) if timing else "not measured"
        if timing and timing.get("finished_at"):
            measured += f" (finished {str(timing['finished_at'])[:10]})"
        lines.append(f"  {track:<14} {state:<24} {commit:<14} {when:<17} {measured}")
    absent = [t for t in TRACKS if not (track_results(t, profile) / MANIFEST).exists()]
    if absent:
        flag = "" if profile == "cpu" else f" --profile {profile}"
        lines.append(f"  (make the missing ones with `lab run {absent[0]}{flag}`, or `lab run all{flag}`)")
    lines.append("profiles:")
    lines += [f"  {p.name:<6} {p.description}" for p in PROFILES.values()]
    return "\n".join(lines)


def _rechart(which: str, profile: str) -> None:
    """Redraw every chart of the track(s) from the Parquet files in results/ (no training, no model)."""
    from lab.paths import shown, track_results
    from lab.results import MANIFEST, rechart
    from lab.tracks import TRACKS, get_track

    if which != "all":
        get_track(which)  # an unknown name lists the tracks
    names = list(TRACKS) if which == "all" else [which]
    for track in names:
        if which == "all" and not (track_results(track, profile) / MANIFEST).exists():
            print(f"{track}: no results on profile {profile}, skipped")
            continue
        redrawn = rechart(track, profile, get_track(track).CHARTS)
        print(f"{track}: {len(redrawn)} charts redrawn in {shown(track_results(track, profile))}/")


def _site(args: argparse.Namespace) -> None:
    from lab.site import build as site

    if args.action == "build":
        print(f"site built into {site.build_site()}")
    else:
        site.serve_site(port=args.port)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ap = _Parser(prog="lab", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    ls = sub.add_parser("list", help="tracks, their results and measured times, and profiles")
    ls.add_argument("--profile", default="cpu", help="whose results to list (default cpu: the committed ones)")
    r = sub.add_parser("run", help="run a track, or all")
    r.add_argument("track")
    r.add_argument("--profile", default="cpu")
    r.add_argument("--fresh", action="store_true", help="ignore checkpoints of an interrupted run")
    b = sub.add_parser("bench", help="benchmarks")
    b.add_argument("which", choices=["all", *_workloads(), *BENCHMARKS, "headlines", "cost"])
    b.add_argument("--before", default=None, help="headlines: the commit whose committed results to compare with")
    b.add_argument("--profile", default="cpu")
    b.add_argument("--steps", type=_count, default=None, help="timed steps (finetune: default 6)")
    b.add_argument("--repeats", type=_count, default=5, help="speed suite: alternated calls per path (median)")
    rc = sub.add_parser("rechart", help="redraw a track's charts from its results after changing chart code")
    rc.add_argument("track", help="a track name, or all")
    rc.add_argument("--profile", default="cpu")
    t = sub.add_parser("transcoders", help="per-layer transcoders for circuit-tracer (Track E)")
    t.add_argument("action", choices=["build"])
    t.add_argument("--profile", default="cpu")
    t.add_argument("--fresh", action="store_true", help="retrain even if built (and ignore a build's checkpoint)")
    s = sub.add_parser("site", help="the offline site")
    s.add_argument("action", choices=["build", "serve"])
    s.add_argument("--port", type=_port, default=8000)
    sub.add_parser("questions", help="check QUESTIONS.md evidence links")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "list":
            from lab.profiles import get_profile

            print(_list(get_profile(args.profile).name))
        elif args.cmd == "run":
            _run(args)
        elif args.cmd == "bench" and args.which == "headlines":
            from lab.bench import headlines

            if not args.before:
                raise LabError("`lab bench headlines` compares with a commit: add --before <commit>")
            from lab.tracks import headlines as fields_of

            print(headlines.run(_profile(args.profile), args.before, fields_of()))
        elif args.cmd == "bench" and args.which == "cost":
            from lab.bench import cost_report

            cost_report.run(_profile(args.profile))
        elif args.cmd == "bench" and (args.which == "all" or args.which in _workloads()):
            from lab.bench import suite

            if args.steps is not None:
                raise LabError(f"`lab bench {args.which}` takes --repeats, not --steps: drop --steps")
            if args.repeats < 5:
                raise LabError(
                    f"--repeats {args.repeats}: the speed suite reports medians of at least 5; use 5 or more"
                )
            names = None if args.which == "all" else [args.which]
            suite.run(_profile(args.profile), names, repeats=args.repeats)
        elif args.cmd == "bench":
            bench = _function(BENCHMARKS[args.which])
            options = {"steps": args.steps} if args.steps is not None else {}
            if options and not _takes_steps(bench):
                takes = ", ".join(n for n, path in BENCHMARKS.items() if _takes_steps(_function(path)))
                verb = "does" if len(takes.split(", ")) == 1 else "do"
                raise LabError(f"`lab bench {args.which}` takes no --steps (only {takes} {verb}): drop it")
            bench(_profile(args.profile), **options)
        elif args.cmd == "rechart":
            _rechart(args.track, _profile(args.profile).name)
        elif args.cmd == "transcoders":
            from lab.tracks.E_circuits.run import build_transcoders

            print(build_transcoders(_profile(args.profile), fresh=args.fresh))
        elif args.cmd == "site":
            _site(args)
        elif args.cmd == "questions":
            from lab.site.questions import check_evidence

            problems = check_evidence()
            for p in problems:
                print(f"lab: error: {p}", file=sys.stderr)
            if problems:
                return 1
            print("QUESTIONS.md: every ANSWERED question links to evidence that exists")
    except LabError as e:  # one line per problem when there are several (e.g. every damaged result file)
        for line in str(e).splitlines() or [""]:
            print(f"lab: error: {line}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, permission denied, read-only, port taken: no traceback for everyday errors
        print(f"lab: error: {os_error_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lab: interrupted — run the same command again to resume from the last checkpoint", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
