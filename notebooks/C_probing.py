# /// script
# [tool.marimo.opengraph]
# title = "C · The residual stream"
# description = "Your prompt: the logit lens, what attention and MLPs write, residual norms."
# ///
import marimo

__generated_with = "0.25.2"
app = marimo.App(width="medium", app_title="Probing the residual stream")


@app.cell
def _():
    import marimo as mo

    from lab.data.prompts import PROMPTS
    from lab.errors import LabError
    from lab.models.loading import load_model
    from lab.notebook import or_exit, profile_picker, script_mode, script_profile, table
    from lab.profiles import get_profile
    from lab.results import read_result
    from lab.tracks.C_probing import charts, frames
    from lab.tracks.C_probing import run as track

    return (
        LabError,
        PROMPTS,
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
        table,
        track,
    )


@app.cell
def _(mo):
    mo.md(r"""
    # Probing the residual stream

    **HYPOTHESIS.** The residual stream of SmolLM2-135M grows in norm with depth; the MLPs write larger vectors
    than attention in most layers; read through the model's own final norm and unembedding (the *logit lens*),
    the early layers say little about the next token and the final prediction becomes the top guess only in
    the last few layers; positions grow more similar to each other with depth.

    **METHOD.** Capture `hook_resid_pre`, `hook_attn_out`, `hook_resid_mid`, `hook_mlp_out` and `hook_resid_post`
    of every layer (`lab.interp.capture`, checked by the identities `resid_pre + attn_out = resid_mid` and
    `resid_mid + mlp_out = resid_post`) on six fixed prompts. For each layer and token: norms, the projection of
    each sublayer's output onto the stream it is added to, the logit lens
    $\mathrm{softmax}(W_U\,\mathrm{norm}(x_\ell))$ with its KL divergence to the final distribution, cosine
    similarity between positions, and the KL change when one sublayer's output is zeroed.

    **QUESTIONS.** Q11 (what the residual stream carries), Q12 (FFN vs attention), Q13 (which tools work with
    which architecture). See `QUESTIONS.md`.
    """)
    return


@app.cell
def _(PROMPTS, mo, profile_picker, script_mode):
    script, cli = script_mode(mo)
    profile_ui, legend = profile_picker(
        mo,
        {
            "cpu": "SmolLM2-135M-Instruct, 30 layers: loads in about 10 s",
            "smoke": "a tiny random Llama, 2 layers: the residual stream of an untrained model",
        },
        text="model profile",
    )
    prompt_ui = mo.ui.text_area(value=PROMPTS[0], label="prompt", full_width=True, rows=2)
    controls = (
        None if script else mo.vstack([mo.hstack([profile_ui, legend], justify="start", align="center"), prompt_ui])
    )
    controls
    return cli, profile_ui, prompt_ui, script


@app.cell
def _(cli, mo, or_exit, script, script_profile, track):
    # Script: `python notebooks/C_probing.py -- --profile cpu` runs the track (and the benchmark) and writes
    # results/C_probing/.
    mo.stop(not script)
    _summary = or_exit("C_probing", lambda: track.run(script_profile("C_probing", cli)))
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
    # The slider depends on the model only, so it keeps its place when the prompt changes.
    n_layers = lm.model.config.num_hidden_layers
    layer_ui = mo.ui.slider(0, n_layers - 1, value=n_layers // 2, label="layer (similarity map)", show_value=True)
    return layer_ui, n_layers


@app.cell
def _(LabError, frames, layer_ui, lm, mo, prompt_ui, script):
    mo.stop(script)
    try:
        with mo.status.spinner("capturing the residual stream on your prompt"):
            one = frames.prompt_frames(lm, prompt_ui.value)
    except LabError as err:
        mo.stop(True, mo.md(f"**{err}**"))
    layer_ui
    return (one,)


@app.cell
def _(charts, frames, layer_ui, mo, n_layers, one, script):
    mo.stop(script)
    mo.vstack(
        [
            mo.md("### Logit lens on your prompt (colour: KL to the final distribution; text: top token)"),
            charts.logit_lens(one["lens"]),
            mo.md("### Attention vs MLP: share of the norm written by attention, per layer and token"),
            charts.contribution_tokens(one["contrib"]),
            mo.md("### Per layer: output norms and alignment with the stream"),
            charts.contribution_profile(frames.contributions_by_layer(one["contrib"])),
            mo.md("### Residual norm per layer"),
            charts.norms(frames.norms_by_layer(one["norms"])),
            mo.md(f"### Cosine similarity between positions after layer {layer_ui.value}"),
            charts.similarity_maps(frames.similarity_map(one["capture"], n_layers, layer_ui.value)),
        ]
    )
    return


@app.cell
def _(LabError, charts, mo, read_result, table):
    # The committed cpu-profile run (what the site shows), read back from results/C_probing/.
    try:
        _summ = read_result("C_probing", "summary").row(0, named=True)
        _lens = read_result("C_probing", "lens_profile")
        _bench = read_result("C_probing", "benchmark")
    except LabError as err:
        committed = mo.md(f"No committed results yet: {err}")
    else:
        committed = mo.vstack(
            [
                mo.md(f"""
    ## RESULTS (committed `cpu` run, {_summ["model"]})

    Median depth from which the logit lens's top-1 token equals the final one:
    **{_summ["first_stable_depth_median"]:.0f}** of {_summ["n_layers"]} blocks. Mean KL to the final distribution
    after half the blocks: {_summ["lens_kl_mid"]:.2f} nats.
    """),
                charts.lens_profile(_lens),
                mo.md("**What capturing costs:** one forward pass over the six prompts, median of the repeats"),
                table(
                    mo,
                    _bench,
                    {
                        "method": "method",
                        "median_s": "median time",
                        "ratio_to_hf_forward": "time / plain HF forward",
                        "tokens": "tokens",
                    },
                ),
            ]
        )
    committed
    return


if __name__ == "__main__":
    app.run()
