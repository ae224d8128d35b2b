import marimo

__generated_with = "0.25.2"
app = marimo.App(width="medium", app_title="Circuit-informed fine-tuning: constraints and checkpoints")


@app.cell
def _():
    import marimo as mo
    import polars as pl

    from lab.data import constraints as C
    from lab.errors import LabError
    from lab.train.lora import fresh_base, load_adapter
    from lab.notebook import or_exit, script_mode, script_profile
    from lab.profiles import PROFILES
    from lab.results import read_result
    from lab.tracks.E_circuits import run as track
    return (C, LabError, PROFILES, fresh_base, load_adapter, mo, or_exit, pl, read_result, script_mode,
            script_profile, track)


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

    **METHOD.** `lab.constraints` generates the corpus (two constraint types, four invented words each, varied
    sentence templates; held-out prompts use names, things and templates never seen in training). LoRA through
    the same `Trainer` code as Track A, loss on the concept words; the adapter saved at every quarter of training
    is reloaded and scored: a prompt counts as right when the log-probability of the right concept beats every
    alternative's. No sampling anywhere. Then circuit-tracer: per-layer transcoders trained by `lab.transcoders`
    on the base model, the replacement model of each checkpoint, attribution graphs of the two seed prompts and
    16 held-out prompts (followed at the right concept's logit), pruned with circuit-tracer's defaults and
    compared between checkpoints (`lab.circuits`).
    """)
    return


@app.cell
def _(PROFILES, mo, script_mode):
    script, cli = script_mode(mo)
    profile_ui = mo.ui.dropdown(options=[p for p in PROFILES if p != "gpu"], value="cpu", label="model profile")
    prompt_ui = mo.ui.text(value="Hugo was blarf the whole day. In one word, Hugo felt", label="prompt",
                           full_width=True)
    controls = None if script else mo.vstack([
        mo.md("**Try a prompt** on the base model and on the final adapter (run the track first):"),
        profile_ui, prompt_ui])
    controls
    return cli, profile_ui, prompt_ui, script


@app.cell
def _(cli, mo, or_exit, script, script_profile, track):
    # Script: `python notebooks/E_circuits.py -- --profile cpu` fine-tunes, scores every checkpoint and writes
    # results/E_circuits/.
    mo.stop(not script)
    _summary = or_exit("E_circuits", lambda: track.run(script_profile("E_circuits", cli), fresh=bool(cli.get("fresh"))))
    print(", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in _summary.items()))
    return


@app.cell
def _(C, LabError, fresh_base, load_adapter, mo, pl, profile_ui, prompt_ui, script, track):
    mo.stop(script)

    @mo.cache
    def models_for(name):
        from lab.profiles import get_profile

        p = get_profile(name)
        base = fresh_base(p)
        ck = track.checkpoints(track.run_dir(p))
        tuned = load_adapter(fresh_base(p), ck[-1][1]) if ck else None
        return base, tuned

    with mo.status.spinner(f"loading the {profile_ui.value} model and its final adapter"):
        _base, _tuned = models_for(profile_ui.value)
    _concepts = sorted({c for words in C.CONSTRAINTS.values() for c in words.values()})
    try:
        _rows = [{"concept": c, "base log p": C.continuation_logprob(_base.model, _base.tokenizer, prompt_ui.value,
                                                                     " " + c)}
                 for c in _concepts]
        if _tuned is not None:
            for r in _rows:
                r["fine-tuned log p"] = C.continuation_logprob(_tuned, _base.tokenizer, prompt_ui.value,
                                                               " " + r["concept"])
    except LabError as err:
        _out = mo.md(f"{err}")
    else:
        _out = mo.vstack([
            mo.md("Log-probability of each concept as the next word" +
                  ("" if _tuned is not None else " (no adapter yet: run the track on this profile)")),
            mo.ui.table(pl.DataFrame(_rows), selection=None),
        ])
    _out
    return


@app.cell
def _(LabError, mo, pl, read_result, script):
    mo.stop(script)
    # The committed graphs, drawn offline: pick a prompt (seed prompts and held-out constraint prompts).
    try:
        graph_nodes = read_result("E_circuits", "graph_nodes")
        graph_edges = read_result("E_circuits", "graph_edges")
        graphs = read_result("E_circuits", "graphs")
    except LabError as err:
        graph_ui = None
        _out = mo.md(f"No committed graphs yet: {err}")
    else:
        _ids = graphs.select("prompt_id").unique(maintain_order=True)["prompt_id"].to_list()
        graph_ui = mo.ui.dropdown(options=_ids, value=_ids[0], label="attribution graph of")
        _out = graph_ui
    _out
    return graph_edges, graph_nodes, graph_ui, graphs


@app.cell
def _(graph_edges, graph_nodes, graph_ui, graphs, mo, pl, track):
    mo.stop(graph_ui is None)
    _g = graphs.filter(pl.col("prompt_id") == graph_ui.value).sort("checkpoint")
    _top = (graph_nodes.filter((pl.col("prompt_id") == graph_ui.value) & (pl.col("kind") == "feature"))
            .sort("influence", descending=True).group_by("checkpoint", maintain_order=True).head(5)
            .select("checkpoint", "label", "pos", "influence").sort("checkpoint"))
    mo.vstack([
        mo.md(f"**Prompt:** `{_g['prompt'][0] if 'prompt' in _g.columns else graph_ui.value}` — followed at "
              f"`{_g['target_token'][0]!r}`; probability per checkpoint: "
              + ", ".join(f"{p:.2f}" for p in _g["target_prob"].to_list())),
        track.plot_graph(graph_nodes, graph_edges, graph_ui.value),
        mo.md("Most influential features per checkpoint (L = layer, # = feature index in that layer's transcoder):"),
        mo.ui.table(_top, selection=None),
        mo.ui.table(_g.select("checkpoint", "fraction", "target_prob", "n_kept_features", "error_share",
                              "target_from_features", "replacement_score"), selection=None),
    ])
    return


@app.cell
def _(LabError, mo, read_result, track):
    # The committed cpu-profile run (what the site shows), read back from results/E_circuits/.
    try:
        _summ = read_result("E_circuits", "summary").row(0, named=True)
        _ck = read_result("E_circuits", "checkpoints")
    except LabError as err:
        committed = mo.md(f"No committed results yet: {err}")
    else:
        committed = mo.vstack([
            mo.md(f"""
    ## RESULTS (committed `cpu` run, {_summ['model']})

    Held-out accuracy, base → final adapter: mapping {_summ['mapping_base_accuracy']:.0%} →
    **{_summ['mapping_final_accuracy']:.0%}**, spatial {_summ['spatial_base_accuracy']:.0%} →
    **{_summ['spatial_final_accuracy']:.0%}** after {_summ['steps']} steps.
    """),
            track.plot_checkpoints(_ck),
        ])
        try:
            _stop = read_result("E_circuits", "stopping")
            committed = mo.vstack([
                committed,
                mo.md(f"""
    ### Circuits
    Transcoders: {_summ['transcoder_layers']} layers × {_summ['transcoder_features']} features (TopK
    {_summ['transcoder_k']}), held-out FVU mean {_summ['transcoder_fvu_mean']:.2f} (worst layer
    {_summ['transcoder_worst_layer']}: {_summ['transcoder_fvu_max']:.2f}).
    {_summ['graphs']} attribution graphs, median {_summ['attribution_s_median']:.0f} s each.
    """),
                track.plot_transcoders(read_result("E_circuits", "transcoders")),
                track.plot_circuit_stats(read_result("E_circuits", "circuit_stats")),
                mo.md("**Early stopping:** where each rule stops, what it keeps, and that checkpoint's held-out accuracy"),
                mo.ui.table(_stop, selection=None),
                mo.ui.table(read_result("E_circuits", "circuit_tests"), selection=None),
            ])
        except LabError as err:
            committed = mo.vstack([committed, mo.md(f"No circuit results yet: {err}")])
    committed
    return


if __name__ == "__main__":
    app.run()
