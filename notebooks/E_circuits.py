# /// script
# [tool.marimo.opengraph]
# title = "E · Circuits of fine-tuning"
# description = "Invented words, base vs fine-tuned; attribution graphs per training checkpoint."
# ///
import marimo

__generated_with = "0.25.2"
app = marimo.App(width="medium", app_title="Circuit-informed fine-tuning: constraints and checkpoints")


@app.cell
def _():
    import marimo as mo

    from lab.errors import LabError
    from lab.notebook import duration, or_exit, profile_picker, script_mode, script_profile, table
    from lab.profiles import get_profile
    from lab.results import read_result
    from lab.tracks.E_circuits import charts, frames
    from lab.tracks.E_circuits import run as track

    return (
        LabError,
        charts,
        duration,
        frames,
        get_profile,
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
    # Circuit-informed fine-tuning: can a 135M model learn invented words, and can its circuits tell when?

    **HYPOTHESIS.** SmolLM2-135M-Instruct cannot know that "blarf" means *happy* or that to "florp" is to move
    *up*: on held-out prompts it should sit at chance (one right concept against three alternatives). A short
    LoRA fine-tune on a few dozen sentences per constraint type should teach both types, and the checkpoints at
    25/50/75/100 % of training show *when* each type is learned. If attribution graphs are a microscope on
    learning, the circuit behind the right answer should form, then stop changing, around the same time, and a
    "the circuit has settled" signal could stop training instead of the validation loss.

    **METHOD.** `lab.data.constraints` generates the corpus (two constraint types, four invented words each, varied
    sentence templates; held-out prompts use names, things and templates never seen in training). LoRA through
    the same `Trainer` code as Track A, loss on the concept words; the adapter saved at every quarter of training
    is reloaded and scored: a prompt counts as right when the log-probability of the right concept beats every
    alternative's. No sampling anywhere. Then circuit-tracer: per-layer transcoders trained by `lab.interp.transcoders`
    on the base model, the replacement model of each checkpoint, attribution graphs of the two seed prompts and
    16 held-out prompts (followed at the right concept's logit), pruned with circuit-tracer's defaults and
    compared between checkpoints (`lab.interp.circuits`).
    """)
    return


@app.cell
def _(LabError, duration, mo, read_result):
    # How long `lab run E_circuits` takes on cpu, from the committed run's own timings.
    try:
        _s = read_result("E_circuits", "summary").row(0, named=True)
    except LabError:
        cpu_cost = "about 25 minutes on 2 CPU cores"
    else:
        _parts = {
            "fine-tuning": _s["train_time_s"],
            "transcoders": _s["transcoder_train_s"],
            "attribution graphs": _s["attribution_s_total"],
        }
        cpu_cost = (
            f"about {duration(sum(_parts.values()))} on 2 CPU cores ("
            + ", ".join(f"{name} {duration(sec)}" for name, sec in _parts.items())
            + ")"
        )
    return (cpu_cost,)


@app.cell
def _(cpu_cost, mo, profile_picker, script_mode):
    script, cli = script_mode(mo)
    profile_ui, legend = profile_picker(
        mo,
        {
            "cpu": f"SmolLM2-135M-Instruct; its fine-tuned adapter comes from `lab run E_circuits`: {cpu_cost}",
            "smoke": "a tiny random Llama; `lab run E_circuits --profile smoke` makes its adapter in seconds "
            "(its numbers mean nothing)",
        },
        text="model profile",
    )
    prompt_ui = mo.ui.text(
        value="Hugo was blarf the whole day. In one word, Hugo felt", label="prompt", full_width=True
    )
    controls = (
        None
        if script
        else mo.vstack(
            [
                mo.md("**Try a prompt** on the base model and on the track's final adapter:"),
                mo.hstack([profile_ui, legend], justify="start", align="center"),
                prompt_ui,
            ]
        )
    )
    controls
    return cli, profile_ui, prompt_ui, script


@app.cell
def _(cli, mo, or_exit, script, script_profile, track):
    # Script: `python notebooks/E_circuits.py -- --profile cpu` fine-tunes, scores every checkpoint and writes
    # results/E_circuits/.
    mo.stop(not script)
    _summary = or_exit("E_circuits", lambda: track.run(script_profile("E_circuits", cli), fresh=bool(cli.get("fresh"))))
    print(_summary.line())
    return


@app.cell
def _(LabError, cpu_cost, frames, get_profile, mo, profile_ui, prompt_ui, script, table, track):
    mo.stop(script)

    @mo.cache
    def models_for(name):
        return track.final_models(get_profile(name))

    _name = profile_ui.value
    with mo.status.spinner(f"loading the {_name} model and its final adapter"):
        _base, _tuned = models_for(_name)
    if _tuned is None:
        _cost = cpu_cost if _name == "cpu" else "seconds"
        _first = mo.callout(
            mo.md(
                f"**No fine-tuned adapter for `{_name}` yet**, so only the base model is scored. Run the track "
                f"first: `.venv/bin/lab run E_circuits{'' if _name == 'cpu' else ' --profile ' + _name}` "
                f"({_cost}; it fine-tunes, then builds the transcoders and the attribution graphs), then reload "
                "this page."
            ),
            kind="warn",
        )
    else:
        _first = mo.md("")
    try:
        _scores = frames.concept_logprobs(_base.model, _tuned, _base.tokenizer, prompt_ui.value)
    except LabError as err:
        _out = mo.md(f"{err}")
    else:
        _out = mo.vstack(
            [
                _first,
                mo.md("Log-probability of each concept as the next word (higher is likelier):"),
                table(mo, _scores),
            ]
        )
    _out
    return


@app.cell
def _(LabError, frames, mo, read_result, script):
    mo.stop(script)
    # The committed graphs, drawn offline: pick a prompt (seed prompts and held-out constraint prompts).
    try:
        graph_nodes = read_result("E_circuits", "graph_nodes")
        graph_edges = read_result("E_circuits", "graph_edges")
        graphs = read_result("E_circuits", "graphs")
        try:  # top-activating held-out contexts of the published graphs' features
            feature_labels = read_result("E_circuits", "feature_labels")
        except LabError:
            feature_labels = None
    except LabError as err:
        graph_ui, feature_labels = None, None
        _out = mo.md(f"No committed graphs yet: {err}")
    else:
        _ids = frames.prompt_ids(graphs)
        graph_ui = mo.ui.dropdown(options=_ids, value=_ids[0], label="attribution graph of")
        _out = graph_ui
    _out
    return feature_labels, graph_edges, graph_nodes, graph_ui, graphs


@app.cell
def _(charts, feature_labels, frames, graph_edges, graph_nodes, graph_ui, graphs, mo, table):
    mo.stop(graph_ui is None)
    _g = frames.graph_rows(graphs, graph_ui.value)
    _top = frames.top_features(graph_nodes, graph_ui.value, labels=feature_labels)
    mo.vstack(
        [
            mo.md(
                f"**Prompt:** `{_g['prompt'][0] if 'prompt' in _g.columns else graph_ui.value}` — followed at "
                f"`{_g['target_token'][0]!r}`; probability per checkpoint: "
                + ", ".join(f"{p:.2f}" for p in _g["target_prob"].to_list())
            ),
            charts.plot_graph(frames.graph_drawing(graph_nodes, graph_edges, graph_ui.value)),
            mo.md(
                "Most influential features per checkpoint (L = layer, # = feature index in that layer's "
                "transcoder); *fires on*: the tokens it fires on most in held-out text, *context*: its strongest "
                "held-out context (the firing token in brackets; published graphs' features only):"
            ),
            table(
                mo,
                _top,
                {"checkpoint": "checkpoint", "label": "feature", "pos": "position", "influence": "influence"}
                | ({"fires_on": "fires on", "context": "context"} if "fires_on" in _top.columns else {}),
            ),
            table(
                mo,
                _g,
                {
                    "checkpoint": "checkpoint",
                    "fraction": "share of training",
                    "target_prob": "p(target)",
                    "n_kept_features": "features kept",
                    "error_share": "error share",
                    "target_from_features": "target logit from features",
                    "replacement_score": "replacement score",
                },
                percent=("fraction",),
            ),
        ]
    )
    return


@app.cell
def _(LabError, charts, mo, read_result, table):
    # The committed cpu-profile run (what the site shows), read back from results/E_circuits/.
    try:
        _summ = read_result("E_circuits", "summary").row(0, named=True)
        _ck = read_result("E_circuits", "checkpoints")
    except LabError as err:
        committed = mo.md(f"No committed results yet: {err}")
    else:
        committed = mo.vstack(
            [
                mo.md(f"""
    ## RESULTS (committed `cpu` run, {_summ["model"]})

    Held-out accuracy, base → final adapter: mapping {_summ["mapping_base_accuracy"]:.0%} →
    **{_summ["mapping_final_accuracy"]:.0%}**, spatial {_summ["spatial_base_accuracy"]:.0%} →
    **{_summ["spatial_final_accuracy"]:.0%}** after {_summ["steps"]} steps.
    """),
                charts.plot_checkpoints(_ck),
            ]
        )
        try:
            _stop = read_result("E_circuits", "stopping")
            committed = mo.vstack(
                [
                    committed,
                    mo.md(f"""
    ### Circuits
    Transcoders: {_summ["transcoder_layers"]} layers × {_summ["transcoder_features"]} features (TopK
    {_summ["transcoder_k"]}), held-out FVU mean {_summ["transcoder_fvu_mean"]:.2f} (worst layer
    {_summ["transcoder_worst_layer"]}: {_summ["transcoder_fvu_max"]:.2f}).
    {_summ["graphs"]} attribution graphs, median {_summ["attribution_s_median"]:.0f} s each.
    """),
                    charts.plot_transcoders(read_result("E_circuits", "transcoders")),
                    charts.plot_circuit_stats(read_result("E_circuits", "circuit_stats")),
                    mo.md(
                        "**Early stopping:** where each rule stops, what it keeps, and that checkpoint's "
                        "held-out accuracy"
                    ),
                    table(
                        mo,
                        _stop,
                        {
                            "constraint_type": "constraint",
                            "rule": "rule",
                            "fraction": "stops at",
                            "steps_trained": "steps trained",
                            "kept_checkpoint": "checkpoint kept",
                            "accuracy": "held-out accuracy",
                            "val_loss": "validation loss",
                        },
                        percent=("fraction",),
                    ),
                    mo.md(
                        "**Circuit statistics**: each row compares b with a as its comparison says (b minus a), "
                        "paired over prompts; p from a sign-flip test:"
                    ),
                    table(
                        mo,
                        read_result("E_circuits", "circuit_tests"),
                        {
                            "constraint_type": "constraint",
                            "metric": "metric",
                            "comparison": "comparison",
                            "a_mean": "a",
                            "b_mean": "b",
                            "diff_mean": "b − a",
                            "diff_lo": "95 % from",
                            "diff_hi": "to",
                            "p_sign_flip": "p",
                            "n": "prompts",
                        },
                    ),
                ]
            )
        except LabError as err:
            committed = mo.vstack([committed, mo.md(f"No circuit results yet: {err}")])
    committed
    return


@app.cell
def _(LabError, charts, mo, read_result, table):
    # The checks of the committed graphs: where the followed logit comes from, whether the graph's direct effects
    # predict interventions, transcoders adapted to the fine-tuned model, and both stopping rules over the seeds.
    try:
        _acc = read_result("E_circuits", "accounting")
        _checks = read_result("E_circuits", "interventions")
        _fit = read_result("E_circuits", "intervention_fit")
        _seeds = read_result("E_circuits", "seed_stopping")
    except LabError as err:
        checks = mo.md(f"No graph checks in the committed results yet: {err}")
    else:
        _parts = [
            mo.md("### Where the followed logit comes from (every part, shares of the demeaned logit)"),
            charts.plot_accounting(_acc),
            mo.md("### Interventions: the graph's predicted direct effect against the measured change"),
            charts.plot_interventions(_checks),
            table(
                mo,
                _fit,
                {
                    "fraction": "share of training",
                    "n": "checks",
                    "r_whole": "r (whole model)",
                    "same_sign_whole": "same sign",
                    "r_frozen": "r (all else frozen)",
                },
                percent=("fraction", "same_sign_whole"),
            ),
            mo.md("### Stopping rules over the fine-tune seeds"),
            table(
                mo,
                _seeds,
                {
                    "seed": "seed",
                    "constraint_type": "constraint",
                    "rule": "rule",
                    "fraction": "stops at",
                    "steps_trained": "steps trained",
                    "accuracy": "held-out accuracy",
                    "threshold": "circuit threshold",
                },
                percent=("fraction",),
            ),
        ]
        try:
            _parts += [
                mo.md("### Transcoders adapted to the fine-tuned model"),
                charts.plot_adapted(read_result("E_circuits", "adapted")),
            ]
        except LabError:
            pass
        checks = mo.vstack(_parts)
    checks
    return


if __name__ == "__main__":
    app.run()
