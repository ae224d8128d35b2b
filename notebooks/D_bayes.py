# /// script
# [tool.marimo.opengraph]
# title = "D · Bayesian wind tunnel"
# description = "Train a small transformer on the bijection task; its entropy error vs the exact posterior."
# ///
import marimo

__generated_with = "0.25.2"
app = marimo.App(width="medium", app_title="Bayesian wind tunnel")


@app.cell
def _():
    import marimo as mo

    from lab.errors import LabError
    from lab.notebook import or_exit, profile_picker, progress, script_mode, script_profile, table
    from lab.profiles import get_profile
    from lab.results import read_result
    from lab.tracks.D_bayes import charts, frames
    from lab.tracks.D_bayes import run as track
    from lab.tracks.D_bayes.config import config_for, custom_candidate

    return (
        LabError,
        charts,
        config_for,
        custom_candidate,
        frames,
        get_profile,
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
    # Does attention do Bayesian inference? A wind tunnel on a CPU

    A reproduction of the bijection "wind tunnel" of *The Bayesian Geometry of Transformer Attention*
    (Agarwal, Dalal & Misra, arXiv:2512.22471). Each sequence shows key→value pairs of a fresh random
    bijection of $V = 20$ values; before the $t$-th value is revealed, the exact posterior is uniform over the
    $V - t + 1$ values not seen yet, so its entropy is $H_t = \log_2(V - t + 1)$ bits. The metric is the mean
    over sequences and positions of $|H_\text{model} - H_t|$, the model's softmax restricted to the value tokens.

    **HYPOTHESIS.** A 2-layer transformer trained for a few minutes on two CPU cores gets within 0.02 bits of
    the exact posterior entropy (the paper's 6-layer model reaches 0.007 after 50k GPU steps); a
    parameter-matched MLP that cannot look at the context stays at the analytic floor of a context-blind guess
    (1.107 bits); of the mechanistic claims, the ones about *values* (attention routes the revealed values,
    the logit lens sharpens with depth) hold, while layer-0 *key* orthogonality does not, because in this
    task a key never repeats, so its identity carries no information.

    **METHOD.** Fresh sequences every step; AdamW with warmup and cosine decay; three seeds for the headline
    number; the MLP and an LSTM as controls; a small configuration search; then key geometry, attention
    routing, PCA of the final states, the logit lens and ablations on the trained models.

    **QUESTIONS.** Q14 in `QUESTIONS.md`: does attention perform Bayesian inference when the correct posterior
    is known exactly?
    """)
    return


@app.cell
def _(LabError, mo, profile_picker, read_result, script_mode):
    script, cli = script_mode(mo)
    try:  # the committed run's pace, to say how long a run takes here
        _s = read_result("D_bayes", "summary").row(0, named=True)
        _pace = f": about {_s['train_s_mean'] / _s['steps'] * 1000:.0f} s per 1,000 steps at width 64 on 2 cores"
    except LabError:
        _pace = ""
    profile_ui, legend = profile_picker(
        mo,
        {
            "cpu": f"V = 20 values, as the paper{_pace}",
            "smoke": "V = 6 values, a toy version: seconds; checks the code, not the paper's claim",
        },
    )
    layers_ui = mo.ui.slider(1, 4, value=2, label="layers", show_value=True)
    width_ui = mo.ui.dropdown(options=["16", "32", "64", "128"], value="64", label="width")
    lr_ui = mo.ui.dropdown(options=["3e-4", "1e-3", "3e-3"], value="1e-3", label="learning rate")
    steps_ui = mo.ui.slider(100, 5000, step=100, value=1000, label="steps", show_value=True)
    train_ui = mo.ui.run_button(label="Train one transformer", kind="success")
    controls = (
        None
        if script
        else mo.vstack(
            [
                mo.md("**Train your own** (not written to results/):"),
                mo.hstack([profile_ui, legend], justify="start", align="center"),
                mo.hstack([layers_ui, width_ui, lr_ui], justify="start", wrap=True),
                mo.hstack([steps_ui, train_ui], justify="start", wrap=True),
            ]
        )
    )
    controls
    return cli, layers_ui, lr_ui, profile_ui, script, steps_ui, train_ui, width_ui


@app.cell
def _(cli, mo, or_exit, script, script_profile, track):
    # Script: `python notebooks/D_bayes.py -- --profile cpu` runs the whole track and writes results/D_bayes/.
    if script:
        _summary = or_exit("D_bayes", lambda: track.run(script_profile("D_bayes", cli), fresh=bool(cli.get("fresh"))))
        print(_summary.line())
    mo.md("")
    return


@app.cell
def _(
    LabError,
    charts,
    config_for,
    custom_candidate,
    frames,
    get_profile,
    layers_ui,
    lr_ui,
    mo,
    profile_ui,
    progress,
    script,
    steps_ui,
    track,
    train_ui,
    width_ui,
):
    # App/editor: train one transformer with the chosen shape, the curve redrawn after every evaluation.
    mo.stop(script or not train_ui.value, mo.md("Press **Train one transformer** to watch the entropy MAE fall."))
    _p = get_profile(profile_ui.value)
    _cfg = config_for(_p)
    _candidate = custom_candidate(
        _cfg, n_layer=layers_ui.value, d_model=int(width_ui.value), lr=float(lr_ui.value), steps=steps_ui.value
    )
    _refs = frames.reference_lines(_cfg.target_mae, _cfg.floor_bits)
    _rows = []

    def _show(row):
        _rows.append(row)
        mo.output.replace(
            mo.vstack(
                [
                    progress(
                        mo,
                        row["step"],
                        steps_ui.value,
                        f"entropy MAE {row['mae_bits']:.4f} bits · KL {row['kl_bits']:.4f} bits · "
                        f"{row['train_s']:.0f} s on {profile_ui.value}",
                    ),
                    charts.curves(frames.curve_lines(frames.live_curve(_rows)), _refs),
                ]
            )
        )

    mo.output.replace(progress(mo, 0, steps_ui.value, f"profile {_p.name}: building the model"))
    try:
        track.train_custom(_p, _candidate, on_eval=_show)
    except LabError as err:
        mo.output.replace(mo.md(f"**Error:** {err}"))
    return


@app.cell
def _(LabError, charts, frames, mo, read_result, table):
    # The committed cpu-profile run (what the site shows), read back from results/D_bayes/.
    try:
        _summ = read_result("D_bayes", "summary").row(0, named=True)
        _curves = read_result("D_bayes", "curves")
        _verdicts = read_result("D_bayes", "verdicts")
        _comparison = read_result("D_bayes", "comparison")
    except LabError as err:
        committed = mo.md(f"No committed results yet: {err}")
    else:
        committed = mo.vstack(
            [
                mo.md(f"""
    ## RESULTS (committed `cpu` run)

    Entropy MAE of the {_summ["n_layer"]}-layer, {_summ["n_params"]:,}-parameter transformer over
    {_summ["n_seeds"]} seeds: **{_summ["mae_mean"]:.4f} ± {_summ["mae_std"]:.4f}** bits
    (range {_summ["mae_min"]:.4f}–{_summ["mae_max"]:.4f}), {_summ["train_s_mean"] / 60:.1f} min of training
    per seed. The context-blind MLP: {_summ["mlp_mae"]:.3f} bits (analytic floor {_summ["floor_bits"]:.3f}).
    """),
                table(
                    mo,
                    _comparison,
                    {
                        "model": "model",
                        "paper_mae_bits": "paper (bits)",
                        "ours_mae_bits": "ours (bits)",
                        "ours_spread": "ours, spread",
                        "our_model": "our model",
                        "paper_model": "the paper's model",
                    },
                ),
                charts.curves(
                    frames.curve_lines(_curves), frames.reference_lines(_summ["target_mae"], _summ["floor_bits"])
                ),
                mo.md("**Claims, one by one:**"),
                table(mo, _verdicts, {"claim": "claim", "paper": "paper", "ours": "ours", "verdict": "verdict"}),
            ]
        )
    committed
    return


@app.cell
def _(LabError, charts, mo, read_result, table):
    # The scale ladder, the authors' table row for row, the HMM wind tunnel and Paper II (committed cpu run).
    try:
        _scale = read_result("D_bayes", "scale")
        _by_size = read_result("D_bayes", "scale_verdicts")
        _table = read_result("D_bayes", "paper_table")
        _hmm = read_result("D_bayes", "hmm_positions")
        _em = read_result("D_bayes", "paper2_curves")
    except LabError as err:
        companions = mo.md(f"No committed scale-ladder results yet: {err}")
    else:
        companions = mo.vstack(
            [
                mo.md("## The paper's table, row for row"),
                table(
                    mo,
                    _table,
                    {
                        "setting": "setting",
                        "model": "model",
                        "metric": "metric",
                        "paper": "paper",
                        "ours": "ours",
                        "our_model": "our model",
                    },
                ),
                mo.md("## Each claim at every size of the ladder"),
                charts.scale(_scale),
                table(
                    mo,
                    _by_size,
                    {
                        "claim": "claim",
                        "size": "size",
                        "n_params": "parameters",
                        "verdict": "verdict",
                        "trend": "with size",
                    },
                    page_size=12,
                ),
                mo.md("## HMM filtering: KL to the exact posterior by position"),
                charts.hmm_positions(_hmm),
                mo.md("## Paper II: one head, SGD against the EM-like schedule"),
                charts.paper2(_em),
            ]
        )
    companions
    return


if __name__ == "__main__":
    app.run()
