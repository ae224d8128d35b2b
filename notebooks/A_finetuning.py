# /// script
# [tool.marimo.opengraph]
# title = "A · Fine-tuning mechanics"
# description = "LoRA sweeps on SmolLM2-135M: loss anatomy, Adam's moments, forgetting, QLoRA."
# ///
import marimo

__generated_with = "0.25.2"
app = marimo.App(width="medium", app_title="Fine-tuning mechanics (LoRA / QLoRA)")


@app.cell
def _():
    import marimo as mo

    from lab.errors import LabError
    from lab.notebook import headlines, or_exit, profile_picker, progress, script_mode, script_profile, table
    from lab.profiles import get_profile
    from lab.results import read_result
    from lab.tracks.A_finetuning import charts, frames
    from lab.tracks.A_finetuning import run as track
    from lab.tracks.A_finetuning.config import TRACK, config_for, plan
    from lab.tracks.A_finetuning.summary import HEADLINES

    return (
        HEADLINES,
        LabError,
        TRACK,
        charts,
        config_for,
        frames,
        get_profile,
        headlines,
        mo,
        or_exit,
        plan,
        profile_picker,
        progress,
        read_result,
        script_mode,
        script_profile,
        table,
        track,
    )


@app.cell
def _(mo):
    mo.md(r"""
    # Fine-tuning mechanics: LoRA and QLoRA on a 135M-parameter model

    **HYPOTHESIS.** About 100 generated examples and 3 epochs of LoRA are enough to make SmolLM2-135M-Instruct
    answer "Log this event: …" with a strict JSON record it has never been told the keys of; the base model
    almost never does. The learning rate matters most (1e-5 barely moves, 5e-3 breaks things), LoRA rank
    matters little for so narrow a task, and the price is a small rise in perplexity on unrelated text.

    **METHOD.** `lab.train.lora.train_lora`: peft LoRA on all attention and MLP projections, transformers
    `Trainer` (AdamW, warmup + cosine), loss on the answer tokens only. One main run (LR 2e-4, rank 8, batch 8)
    is shared by all six experiments; each sweep changes one thing from it. Success is scored on 30 held-out
    prompts with names and cities never seen in training: greedy decoding, `json.loads` plus an exact schema
    check, rate with a Wilson 95 % interval. Forgetting: perplexity on held-out Shakespeare and whether the
    answers to simple probe questions stay identical to the base model's.

    **QUESTIONS.** Q5 (learning rate), Q6 (batch size × LR), Q7 (Adam's moments), Q8 (smallest experiment that
    changes behaviour, and what it forgets) in `QUESTIONS.md`.

    Multi-GPU: the same code runs under `accelerate launch -m lab.cli run A_finetuning --profile gpu`.
    """)
    return


@app.cell
def _(mo, profile_picker, script_mode):
    script, cli = script_mode(mo)
    profile_ui, legend = profile_picker(
        mo,
        {
            "cpu": "SmolLM2-135M-Instruct on the JSON-record task, 12 runs: about 30 minutes on 2 cores the first "
            "time (finished runs are reused after that)",
            "smoke": "a tiny random Llama on generated text: about half a minute; checks that the code runs, "
            "its numbers mean nothing",
        },
    )
    save_ui = mo.ui.checkbox(label="write results/ (replaces the profile's results)", value=False)
    fresh_ui = mo.ui.checkbox(label="fresh (retrain finished runs)", value=False)
    return cli, fresh_ui, legend, profile_ui, save_ui, script


@app.cell
def _(fresh_ui, legend, mo, profile_ui, save_ui, script):
    train_ui = mo.ui.run_button(label=f"Run all experiments on {profile_ui.value}", kind="success")
    controls = (
        None
        if script
        else mo.vstack(
            [mo.hstack([profile_ui, legend], justify="start", align="center", gap=1), save_ui, fresh_ui, train_ui]
        )
    )
    controls
    return (train_ui,)


@app.cell
def _(
    HEADLINES,
    charts,
    cli,
    config_for,
    frames,
    fresh_ui,
    get_profile,
    headlines,
    mo,
    or_exit,
    plan,
    profile_ui,
    progress,
    save_ui,
    script,
    script_profile,
    track,
    train_ui,
):
    # Script: `python notebooks/A_finetuning.py -- --profile cpu` runs every experiment and writes results/.
    # App/editor: press the button; a progress bar and the current run's loss curve update while it trains.
    mo.stop(not script and not train_ui.value, mo.md("Choose a profile and press **Run all experiments**."))
    profile = script_profile("A_finetuning", cli) if script else get_profile(profile_ui.value)
    runs = [s.name for s in plan(config_for(profile))]

    def show(name, step, total, log):
        if script or (step % 5 and step != total):
            return
        which = f"run {name} ({runs.index(name) + 1} of {len(runs)}; finished runs are reused, not shown)"
        chart = charts.plot_live_curve(frames.live_curve(log))
        mo.output.replace(mo.vstack([progress(mo, step, total, which), chart]))

    def _run():
        return track.run(
            profile, on_step=show, progress=script, write=script or save_ui.value, fresh=(not script) and fresh_ui.value
        )

    if not script:
        mo.output.replace(progress(mo, 0, 1, f"profile {profile.name}: loading the model, scoring the base model"))
    summary = or_exit("A_finetuning", _run) if script else _run()
    mo.output.replace(
        mo.vstack(
            [
                mo.md(f"**Done** on `{profile.name}`: {summary.n_runs} runs. Headline numbers:"),
                headlines(mo, summary, HEADLINES),
            ]
        )
    )
    return


@app.cell
def _(cli, script):
    # The results the sections below show: the committed cpu run, or the profile a script run just wrote.
    shown = cli.get("profile", "cpu") if script else "cpu"
    return (shown,)


@app.cell
def _(LabError, TRACK, mo, read_result, shown, table):
    def section(title, names_charts, text=""):
        """A section: each result drawn by its chart function, or as a table of the columns a mapping names."""
        try:
            parts = [mo.md(f"## {title}\n\n{text}")]
            for name, how in names_charts:
                frame = read_result(TRACK, name, profile=shown)
                parts.append(how(frame) if callable(how) else table(mo, frame, how, percent=("exact_lo", "exact_hi")))
            return mo.vstack(parts)
        except LabError as err:
            return mo.md(f"## {title}\n\nNo results yet: {err}")

    return (section,)


@app.cell
def _():
    # The columns each table shows (every column is in the Parquet file, and in the table's download).
    OUTCOMES = {
        "run": "run",
        "final_eval_loss": "final eval loss",
        "format_rate": "valid JSON",
        "exact_rate": "exact",
        "exact_lo": "exact, 95 % from",
        "exact_hi": "to",
        "ppl_ratio": "perplexity ratio",
        "probes_retained": "probes kept (of 12)",
    }
    return (OUTCOMES,)


@app.cell
def _(charts, section):
    section(
        "1. Loss anatomy (main run)",
        [("anatomy", charts.plot_anatomy)],
        "Train loss per step, eval loss on the held-out prompts (dashed rule: lowest eval loss), gradient "
        "norm before clipping, learning rate.",
    )
    return


@app.cell
def _(OUTCOMES, charts, section):
    section(
        "2. Learning-rate sweep",
        [
            ("lr_curves", lambda f: charts.plot_curves(f, "lr", "learning rate")),
            ("lr_outcomes", lambda f: charts.plot_outcomes(f, "lr", "learning rate")),
            ("lr_outcomes", {"lr": "learning rate", **OUTCOMES}),
        ],
    )
    return


@app.cell
def _(OUTCOMES, charts, section):
    section(
        "3. LoRA rank sweep",
        [
            ("rank_curves", lambda f: charts.plot_curves(f, "rank", "LoRA rank")),
            ("rank_outcomes", lambda f: charts.plot_outcomes(f, "rank", "LoRA rank")),
            ("rank_outcomes", {"rank": "LoRA rank", "trainable_params": "trainable parameters", **OUTCOMES}),
        ],
    )
    return


@app.cell
def _(OUTCOMES, charts, section):
    section(
        "4. Batch size × learning rate",
        [
            ("batch_lr", charts.plot_batch_lr),
            (
                "batch_outcomes",
                {"batch_size": "batch", "lr": "learning rate", "rule": "LR rule", "steps": "steps", **OUTCOMES},
            ),
        ],
        "Left: LR scaled linearly with the batch size; right: LR kept at the main run's. Same examples seen.",
    )
    return


@app.cell
def _(charts, frames, section):
    section(
        "5. Adam's moments",
        [
            ("moments", lambda f: charts.plot_moments(frames.moments_by_layer(f))),
            ("moments_by_module", lambda f: charts.plot_moments_by_module(frames.moments_by_module(f))),
            (
                "optimizer_memory",
                {
                    "setting": "setting",
                    "optimizer": "optimizer",
                    "trainable_params": "trainable parameters",
                    "state_mb": "optimizer state (MB)",
                    "bytes_per_param": "bytes per parameter",
                    "state_vs_weights": "state / weights",
                },
            ),
        ],
    )
    return


@app.cell
def _(charts, frames, section):
    section(
        "6. Forgetting, and QLoRA",
        [
            ("runs", lambda f: charts.plot_forgetting(frames.forgetting_frame(f))),
            ("probes", {"run": "run", "prompt": "probe question", "answer": "answer", "retained": "same as base"}),
            (
                "qlora",
                {
                    "run": "run",
                    "quant": "base weights",
                    "weights_mb": "weights (MB)",
                    "final_eval_loss": "final eval loss",
                    "exact_rate": "exact",
                    "ppl_ratio": "perplexity ratio",
                    "tokens_per_s": "tokens/s",
                    "train_time_s": "training time",
                },
            ),
            (
                "samples",
                {
                    "prompt": "prompt",
                    "base_answer": "base model",
                    "base_exact": "exact (base)",
                    "finetuned_answer": "fine-tuned",
                    "finetuned_exact": "exact (fine-tuned)",
                },
            ),
            (
                "benchmark",
                {"mode": "instrumentation", "median_s": "median step time", "ratio": "ratio", "steps": "steps"},
            ),
        ],
    )
    return


if __name__ == "__main__":
    app.run()
