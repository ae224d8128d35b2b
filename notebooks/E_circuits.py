import marimo

__generated_with = "0.25.2"
app = marimo.App(width="medium", app_title="Circuit-informed fine-tuning: constraints and checkpoints")


@app.cell
def _():
    import marimo as mo
    import polars as pl

    from lab import constraints as C
    from lab.errors import LabError
    from lab.finetune import fresh_base, load_adapter
    from lab.notebook import or_exit, script_mode, script_profile
    from lab.profiles import PROFILES
    from lab.results import read_result
    from lab.tracks import E_circuits as track
    return (C, LabError, PROFILES, fresh_base, load_adapter, mo, or_exit, pl, read_result, script_mode,
            script_profile, track)


@app.cell
def _(mo):
    mo.md(r"""
    # Circuit-informed fine-tuning, part 1: can a 135M model learn invented words, and when?

    **HYPOTHESIS.** SmolLM2-135M-Instruct cannot know that "blarf" means *happy* or that to "florp" is to move
    *up*: on held-out prompts it should sit at chance (one right concept against three alternatives). A short
    LoRA fine-tune on a few dozen sentences per constraint type should teach both types, and the checkpoints at
    25/50/75/100 % of training show *when* each type is learned.

    **METHOD.** `lab.constraints` generates the corpus (two constraint types, four invented words each, varied
    sentence templates; held-out prompts use names, things and templates never seen in training). LoRA through
    the same `Trainer` code as Track A, loss on every token of the texts; the adapter saved at every quarter of
    training is reloaded and scored: a prompt counts as right when the log-probability of the right concept beats
    every alternative's. No sampling anywhere.

    **NOT YET.** Transcoders, attribution graphs and the circuit-vs-loss stopping rule (the rest of the track).
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
    committed
    return


if __name__ == "__main__":
    app.run()
