import marimo

__generated_with = "0.25.2"
app = marimo.App(width="medium", app_title="Fine-tuning mechanics (LoRA / QLoRA)")


@app.cell
def _():
    import marimo as mo

    from lab.errors import LabError
    from lab.notebook import or_exit, script_mode, script_profile
    from lab.profiles import PROFILES, get_profile
    from lab.results import read_result
    from lab.tracks.A_finetuning import charts, frames
    from lab.tracks.A_finetuning import run as track
    from lab.tracks.A_finetuning.config import TRACK

    return (
        LabError,
        PROFILES,
        TRACK,
        charts,
        frames,
        get_profile,
        mo,
        or_exit,
        read_result,
        script_mode,
        script_profile,
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
def _(PROFILES, mo, script_mode):
    script, cli = script_mode(mo)
    profile_ui = mo.ui.dropdown(options=[p for p in PROFILES if p != "gpu"], value="smoke", label="profile")
    save_ui = mo.ui.checkbox(label="write results/ (overwrites the committed run)", value=False)
    fresh_ui = mo.ui.checkbox(label="fresh (retrain finished runs)", value=False)
    train_ui = mo.ui.run_button(label="Run all experiments", kind="success")
    controls = None if script else mo.hstack([profile_ui, save_ui, fresh_ui, train_ui], justify="start")
    controls
    return cli, fresh_ui, profile_ui, save_ui, script, train_ui


@app.cell
def _(
    charts,
    cli,
    frames,
    fresh_ui,
    get_profile,
    mo,
    or_exit,
    profile_ui,
    save_ui,
    script,
    script_profile,
    track,
    train_ui,
):
    # Script: `python notebooks/A_finetuning.py -- --profile cpu` runs every experiment and writes results/.
    # App/editor: press the button; the current run's loss curve updates while it trains.
    mo.stop(
        not script and not train_ui.value,
        mo.md("Press **Run all experiments** (smoke: about half a minute; cpu: about half an hour)."),
    )
    profile = script_profile("A_finetuning", cli) if script else get_profile(profile_ui.value)

    def show(name, step, total, log):
        if script or (step % 5 and step != total):
            return
        chart = charts.plot_live_curve(frames.live_curve(log))
        mo.output.replace(mo.vstack([mo.md(f"run **{name}**: step {step}/{total}"), chart]))

    def _run():
        return track.run(
            profile, on_step=show, progress=script, write=script or save_ui.value, fresh=(not script) and fresh_ui.value
        )

    summary = or_exit("A_finetuning", _run) if script else _run()
    mo.output.replace(mo.ui.table(summary.frame(), selection=None))
    return


@app.cell
def _(cli, script):
    # The results the sections below show: the committed cpu run, or the profile a script run just wrote.
    shown = cli.get("profile", "cpu") if script else "cpu"
    return (shown,)


@app.cell
def _(LabError, TRACK, mo, read_result, shown):
    def section(title, names_charts, text=""):
        try:
            parts = [mo.md(f"## {title}\n\n{text}")]
            for name, plot in names_charts:
                frame = read_result(TRACK, name, profile=shown)
                parts.append(plot(frame) if plot else mo.ui.table(frame, selection=None))
            return mo.vstack(parts)
        except LabError as err:
            return mo.md(f"## {title}\n\nNo results yet: {err}")

    return (section,)


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
def _(charts, section):
    section(
        "2. Learning-rate sweep",
        [
            ("lr_curves", lambda f: charts.plot_curves(f, "lr", "learning rate")),
            ("lr_outcomes", lambda f: charts.plot_outcomes(f, "lr", "learning rate")),
            ("lr_outcomes", None),
        ],
    )
    return


@app.cell
def _(charts, section):
    section(
        "3. LoRA rank sweep",
        [
            ("rank_curves", lambda f: charts.plot_curves(f, "rank", "LoRA rank")),
            ("rank_outcomes", lambda f: charts.plot_outcomes(f, "rank", "LoRA rank")),
            ("rank_outcomes", None),
        ],
    )
    return


@app.cell
def _(charts, section):
    section(
        "4. Batch size × learning rate",
        [("batch_lr", charts.plot_batch_lr), ("batch_outcomes", None)],
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
            ("optimizer_memory", None),
        ],
    )
    return


@app.cell
def _(charts, frames, section):
    section(
        "6. Forgetting, and QLoRA",
        [
            ("runs", lambda f: charts.plot_forgetting(frames.forgetting_frame(f))),
            ("probes", None),
            ("qlora", None),
            ("samples", None),
            ("benchmark", None),
        ],
    )
    return


if __name__ == "__main__":
    app.run()
