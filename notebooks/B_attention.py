# /// script
# [tool.marimo.opengraph]
# title = "B · Where heads look"
# description = "Your prompt, a layer and a head: attention patterns and every head's scores."
# ///
import marimo

__generated_with = "0.25.2"
app = marimo.App(width="medium", app_title="Attention: where heads look")


@app.cell
def _():
    import marimo as mo

    from lab.data.prompts import PATTERN_PROMPT
    from lab.errors import LabError
    from lab.models.loading import load_model
    from lab.notebook import or_exit, profile_picker, script_mode, script_profile
    from lab.profiles import get_profile
    from lab.results import read_result
    from lab.tracks.B_attention import charts, frames
    from lab.tracks.B_attention import run as track

    return (
        LabError,
        PATTERN_PROMPT,
        charts,
        frames,
        get_profile,
        load_model,
        mo,
        or_exit,
        profile_picker,
        read_result,
        script_mode,
        script_profile,
        track,
    )


@app.cell
def _(mo):
    mo.md(r"""
    # Attention: where heads look, and what fine-tuning moves

    **HYPOTHESIS.** In SmolLM2-135M most heads of the middle and late layers park most of their weight on the
    first token (an "attention sink"), a few early heads attend to the previous token, and some mid-depth heads
    are induction heads (on a repeated random sequence they attend to the token after the earlier copy of the
    current token). A LoRA fine-tune on the attention projections changes a few heads much more than the rest.

    **METHOD.** Capture every layer's attention probabilities per query head (`lab.interp.capture`, eager attention
    while capturing) on six fixed prompts and eight repeated random token sequences. Per head: the mean entropy
    of a query's attention row, relative to the uniform maximum $\ln(q+1)$; the mean weight on the first token;
    the mean weight on the previous token; and the induction score. For the fine-tune, the Jensen–Shannon
    divergence $\mathrm{JS}(p\,\|\,q) = \tfrac12 \mathrm{KL}(p\,\|\,m) + \tfrac12 \mathrm{KL}(q\,\|\,m)$,
    $m = \tfrac12(p+q)$, between base and fine-tuned rows, in bits.

    **QUESTIONS.** Q9 (how attention distributes), Q10 (what fine-tuning changes), Q17 (what capturing
    attention costs in memory). See `QUESTIONS.md`.
    """)
    return


@app.cell
def _(PATTERN_PROMPT, mo, profile_picker, script_mode):
    script, cli = script_mode(mo)
    profile_ui, legend = profile_picker(
        mo,
        {
            "cpu": "SmolLM2-135M-Instruct, 30 layers × 9 heads: loads in about 10 s",
            "smoke": "a tiny random Llama, 2 layers × 4 heads: the patterns of an untrained model",
        },
        text="model profile",
    )
    prompt_ui = mo.ui.text_area(value=PATTERN_PROMPT, label="prompt", full_width=True, rows=2)
    controls = (
        None if script else mo.vstack([mo.hstack([profile_ui, legend], justify="start", align="center"), prompt_ui])
    )
    controls
    return cli, profile_ui, prompt_ui, script


@app.cell
def _(cli, mo, or_exit, script, script_profile, track):
    # Script: `python notebooks/B_attention.py -- --profile cpu` runs the track and writes results/B_attention/.
    mo.stop(not script)
    _summary = or_exit("B_attention", lambda: track.run(script_profile("B_attention", cli)))
    print(_summary.line())
    return


@app.cell
def _(get_profile, load_model, mo, profile_ui, script):
    mo.stop(script)

    @mo.cache
    def model_for(name):
        return load_model(get_profile(name))

    with mo.status.spinner(f"loading the {profile_ui.value} model"):
        lm = model_for(profile_ui.value)
    return (lm,)


@app.cell
def _(lm, mo, script):
    mo.stop(script)
    # The sliders depend on the model only, so they keep their place when the prompt changes.
    n_layers, n_heads = lm.model.config.num_hidden_layers, lm.model.config.num_attention_heads
    layer_ui = mo.ui.slider(0, n_layers - 1, value=min(n_layers - 1, n_layers // 2), label="layer", show_value=True)
    head_ui = mo.ui.slider(0, n_heads - 1, value=0, label="head", show_value=True)
    return head_ui, layer_ui


@app.cell
def _(LabError, frames, head_ui, layer_ui, lm, mo, prompt_ui, script):
    mo.stop(script)
    try:
        with mo.status.spinner("capturing every head's attention on your prompt"):
            patterns, labels = frames.prompt_patterns(lm, prompt_ui.value)  # (L, H, T, T)
    except LabError as err:
        mo.stop(True, mo.md(f"**{err}**"))
    mo.hstack([layer_ui, head_ui], justify="start")
    return labels, patterns


@app.cell
def _(charts, frames, head_ui, labels, layer_ui, mo, patterns, script):
    mo.stop(script)
    _l, _h = layer_ui.value, head_ui.value
    mo.vstack(
        [
            mo.md(f"### Layer {_l}, head {_h} on your prompt"),
            charts.patterns(frames.one_head(patterns, labels, _l, _h)),
            mo.md("### Every head on your prompt"),
            charts.head_grid(frames.prompt_heads(patterns), metrics=("entropy_norm", "sink_share", "prev_token")),
        ]
    )
    return


@app.cell
def _(LabError, charts, mo, read_result):
    # The committed cpu-profile run (what the site shows), read back from results/B_attention/.
    try:
        _heads = read_result("B_attention", "heads")
        _summ = read_result("B_attention", "summary").row(0, named=True)
        _examples = read_result("B_attention", "patterns")
    except LabError as err:
        committed = mo.md(f"No committed results yet: {err}")
    else:
        committed = mo.vstack(
            [
                mo.md(f"""
    ## RESULTS (committed `cpu` run, {_summ["model"]})

    Mean first-token share over all {_summ["n_heads_total"]} heads: **{_summ["mean_sink_share"]:.2f}**;
    strongest previous-token head L{_summ["top_prev_layer"]} H{_summ["top_prev_head"]}
    ({_summ["top_prev_score"]:.2f}); strongest induction head L{_summ["top_induction_layer"]}
    H{_summ["top_induction_head"]} ({_summ["top_induction_score"]:.2f}, chance {_summ["chance_induction"]:.3f}).
    """),
                charts.head_grid(_heads),
                charts.patterns(_examples),
            ]
        )
    committed
    return


if __name__ == "__main__":
    app.run()
