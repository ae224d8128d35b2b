"""Track E's headline numbers: the fields the site quotes as ``value("E_circuits/summary", "<field>")``."""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from lab.data.constraints import CONSTRAINTS
from lab.interp.circuits import sign_flip_test
from lab.results import Summary
from lab.tracks.E_circuits.config import LEARNED, CircuitsConfig
from lab.tracks.E_circuits.frames import learned_at
from lab.train.lora import FinetuneConfig, FinetuneResult

# The numbers the speed suite compares before and after a change of how the track computes
# (results/bench/headlines.parquet).
HEADLINES = (
    "mapping_final_accuracy",
    "spatial_final_accuracy",
    "transcoder_fvu_mean",
    "transcoder_dead_share_mean",
    "attribution_s_median",
)


@dataclass(frozen=True)
class CircuitsSummary(Summary):
    """One run of the track. ``mapping_*`` / ``spatial_*``: per constraint type; accuracies are held-out (the
    right concept's log-probability beats every alternative's); checkpoint 0 is the base model."""

    model: str  # the fine-tuned model
    n_train: int  # training texts
    n_validation: int  # validation texts
    n_prompts: int  # held-out prompts scored at each checkpoint
    steps: int  # optimiser steps of the fine-tune
    lr: float  # LoRA learning rate
    rank: int  # LoRA rank
    epochs: int  # passes over the training texts
    loss_on: str  # "concept" (concept words only) or "all" (every token)
    trainable_params: int  # LoRA parameters
    learned_threshold: float  # held-out accuracy at which a type counts as learned
    mapping_base_accuracy: float
    mapping_final_accuracy: float
    mapping_base_val_loss: float  # nats per labelled token
    mapping_final_val_loss: float
    mapping_learned_at: float  # first share of training reaching learned_threshold; -1.0: never
    spatial_base_accuracy: float
    spatial_final_accuracy: float
    spatial_base_val_loss: float
    spatial_final_val_loss: float
    spatial_learned_at: float
    train_time_s: float  # time in optimiser steps (tokens / tokens_per_s summed over logged steps)
    transcoder_layers: int  # one transcoder per layer
    transcoder_features: int  # features per transcoder
    transcoder_k: int | None  # TopK active features per token (None for hub transcoders)
    transcoder_fvu_mean: float  # held-out fraction of variance unexplained, mean over layers
    transcoder_fvu_max: float
    transcoder_fvu_min: float
    transcoder_worst_layer: int  # layer with the highest FVU
    transcoder_dead_share_mean: float  # share of features never active on held-out text, mean over layers
    transcoder_train_s: float  # the transcoders' training time (when they were built)
    transcoder_tokens_per_layer: int  # training tokens each transcoder saw
    transcoder_eval_tokens: int  # held-out tokens the quality numbers are measured on
    transcoder_skip: bool  # with a skip connection (W_skip)
    transcoder_auxk_alpha: float  # the AuxK loss's weight (0: none)
    transcoder_layers_at_target: float  # share of layers with held-out FVU <= 0.15 (the target)
    # the followed logit's parts (graph_checks.account), mean share over every graph: the graph's selected features,
    # the features it leaves out, the error nodes, the token embeddings, the nodeless b_dec and BOS MLP terms; and
    # the largest |residual| (logit minus all parts) of any graph, in logit units
    account_selected_share: float
    account_unselected_share: float
    account_error_share: float
    account_token_share: float
    account_nodeless_share: float
    account_residual_max: float
    # the intervention checks (graph_checks.intervene) over every checked graph: Pearson r between the graphs'
    # predicted direct effects and the measured change of the logit through the whole model (mean and range over
    # checkpoints), the share with the predicted sign, and r with everything else frozen (the smallest)
    intervention_checks: int
    intervention_r_whole_mean: float
    intervention_r_whole_min: float
    intervention_r_whole_max: float
    intervention_same_sign_whole: float
    intervention_r_frozen_min: float
    graph_prompts: int  # prompts with an attribution graph at every checkpoint
    graphs: int  # attribution graphs (prompts x checkpoints)
    attribution_s_median: float  # seconds per graph (when computed; cached graphs keep their time)
    attribution_s_total: float
    circuits_wall_s: float  # wall time of the circuit analysis in this run (cached graphs cost nothing)
    settle_threshold: float  # the circuit rule's threshold (feature overlap, positions dropped)
    paraphrase_overlap_min: float  # the base model's overlap between two prompts of one word: range over words
    paraphrase_overlap_max: float
    n_seeds: int  # fine-tune seeds
    seed_final_accuracy_min: float  # the lowest final held-out accuracy of any seed and type
    # per type over the seeds: mean steps each rule trained, the share of seeds where the circuit rule trained fewer
    # steps than the loss rule, and the lowest held-out accuracy of a checkpoint the circuit rule kept
    mapping_seed_circuit_steps: float
    mapping_seed_loss_steps: float
    mapping_seed_circuit_earlier: float
    mapping_seed_circuit_accuracy_min: float
    spatial_seed_circuit_steps: float
    spatial_seed_loss_steps: float
    spatial_seed_circuit_earlier: float
    spatial_seed_circuit_accuracy_min: float
    # early stopping, per type and rule (circuit / loss / oracle): share of training of the kept checkpoint, steps
    # trained before stopping, held-out accuracy of the kept checkpoint
    mapping_circuit_stop_fraction: float
    mapping_circuit_steps: int
    mapping_circuit_accuracy: float
    mapping_loss_stop_fraction: float
    mapping_loss_steps: int
    mapping_loss_accuracy: float
    mapping_oracle_stop_fraction: float
    mapping_oracle_steps: int
    mapping_oracle_accuracy: float
    spatial_circuit_stop_fraction: float
    spatial_circuit_steps: int
    spatial_circuit_accuracy: float
    spatial_loss_stop_fraction: float
    spatial_loss_steps: int
    spatial_loss_accuracy: float
    spatial_oracle_stop_fraction: float
    spatial_oracle_steps: int
    spatial_oracle_accuracy: float
    # transcoders adapted to the fine-tuned model (NaN without): held-out FVU on the fine-tuned model's activations,
    # mean over layers, of the base model's transcoders and of the adapted ones; at the final checkpoint, over the
    # constraint prompts: error share with each set, the sign-flip p of their difference, the two graphs' feature
    # overlap, and the share of kept features that the base model's graph lacks, with each set
    adapted_fvu_base_tc: float
    adapted_fvu_adapted_tc: float
    adapted_error_share_base_tc: float
    adapted_error_share_adapted_tc: float
    adapted_error_share_p: float
    adapted_feature_jaccard: float
    adapted_new_share_base_tc: float
    adapted_new_share_adapted_tc: float
    wall_time_s: float  # the whole run, before writing


ADAPTED = (
    "adapted_fvu_base_tc",
    "adapted_fvu_adapted_tc",
    "adapted_error_share_base_tc",
    "adapted_error_share_adapted_tc",
    "adapted_error_share_p",
    "adapted_feature_jaccard",
    "adapted_new_share_base_tc",
    "adapted_new_share_adapted_tc",
)


def _adapted(results: dict[str, pl.DataFrame]) -> dict:
    """The adapted-transcoder fields of the summary (NaN when the run has none)."""
    if "adapted" not in results:
        return dict.fromkeys(ADAPTED, float("nan"))
    q, a = results["adapted_quality"], results["adapted"].filter(pl.col("constraint_type") != "seed")
    diff = (a["error_share_adapted_tc"] - a["error_share_base_tc"]).to_list()
    return {
        "adapted_fvu_base_tc": float(q["fvu_base"].mean()),
        "adapted_fvu_adapted_tc": float(q["fvu_adapted"].mean()),
        "adapted_error_share_base_tc": float(a["error_share_base_tc"].mean()),
        "adapted_error_share_adapted_tc": float(a["error_share_adapted_tc"].mean()),
        "adapted_error_share_p": sign_flip_test(diff),
        "adapted_feature_jaccard": float(a["feature_jaccard"].mean()),
        "adapted_new_share_base_tc": float(a["new_share_base_tc"].mean()),
        "adapted_new_share_adapted_tc": float(a["new_share_adapted_tc"].mean()),
    }


def _seeds(checkpoints: pl.DataFrame, stopping: pl.DataFrame) -> dict:
    """The seed fields of the summary."""
    last = checkpoints["checkpoint"].max()
    out = {
        "n_seeds": checkpoints["seed"].n_unique(),
        "seed_final_accuracy_min": float(checkpoints.filter(pl.col("checkpoint") == last)["accuracy"].min()),
    }
    for c in CONSTRAINTS:
        mine = stopping.filter(pl.col("constraint_type") == c)
        steps = mine.pivot(on="rule", index="seed", values="steps_trained")
        out |= {
            f"{c}_seed_circuit_steps": float(steps["circuit"].mean()),
            f"{c}_seed_loss_steps": float(steps["loss"].mean()),
            f"{c}_seed_circuit_earlier": float((steps["circuit"] < steps["loss"]).mean()),
            f"{c}_seed_circuit_accuracy_min": float(mine.filter(pl.col("rule") == "circuit")["accuracy"].min()),
        }
    return out


def _checks(results: dict[str, pl.DataFrame]) -> dict:
    """The accounting and intervention fields of the summary."""
    acc, fit, checks = results["accounting"], results["intervention_fit"], results["interventions"]
    out = {
        "account_selected_share": float(acc["selected_features_share"].mean()),
        "account_unselected_share": float(acc["unselected_features_share"].mean()),
        "account_error_share": float(acc["errors_share"].mean()),
        "account_token_share": float(acc["tokens_share"].mean()),
        "account_nodeless_share": float((acc["b_dec_share"] + acc["bos_mlp_share"]).mean()),
        "account_residual_max": float(acc["residual"].abs().max()),
        "intervention_checks": checks.height,
    }
    if not fit.height:
        return (
            out
            | dict.fromkeys(
                ("intervention_r_whole_mean", "intervention_r_whole_min", "intervention_r_whole_max"), float("nan")
            )
            | {"intervention_same_sign_whole": float("nan"), "intervention_r_frozen_min": float("nan")}
        )
    return out | {
        "intervention_r_whole_mean": float(fit["r_whole"].mean()),
        "intervention_r_whole_min": float(fit["r_whole"].min()),
        "intervention_r_whole_max": float(fit["r_whole"].max()),
        "intervention_same_sign_whole": float(((checks["predicted"] * checks["measured"]) > 0).mean()),
        "intervention_r_frozen_min": float(fit["r_frozen"].min()),
    }


def summarize(
    *,
    model: str,
    cfg: CircuitsConfig,
    finetune: FinetuneConfig,
    trained: FinetuneResult,
    train_log: pl.DataFrame,
    results: dict[str, pl.DataFrame],
    transcoder_meta: dict,
    circuits_wall_s: float,
    wall_time_s: float,
) -> CircuitsSummary:
    """The summary of one run, from the frames it writes (``results``: ``checkpoints``, ``prompts``,
    ``transcoders``, ``graphs``, ``stopping``), the fine-tune as run (``finetune``, with the corpus sizes, and
    ``trained``) and the training log's step frame."""
    checkpoints, transcoders, graphs = results["checkpoints"], results["transcoders"], results["graphs"]
    per_type = {}
    for c in CONSTRAINTS:
        rows = checkpoints.filter(pl.col("constraint_type") == c).sort("checkpoint")
        at = learned_at(checkpoints, c)
        per_type |= {
            f"{c}_base_accuracy": rows["accuracy"][0],
            f"{c}_final_accuracy": rows["accuracy"][-1],
            f"{c}_base_val_loss": rows["val_loss"][0],
            f"{c}_final_val_loss": rows["val_loss"][-1],
            f"{c}_learned_at": at if at is not None else -1.0,
        }
    stops = {}
    for row in results["stopping"].iter_rows(named=True):
        k = f"{row['constraint_type']}_{row['rule']}"
        stops |= {
            f"{k}_stop_fraction": row["fraction"],
            f"{k}_steps": row["steps_trained"],
            f"{k}_accuracy": row["accuracy"],
        }
    attribution_s = graphs["attribution_s"].to_list()
    train_s = float((train_log["tokens"] / train_log["tokens_per_s"]).sum()) if train_log.height else 0.0
    return CircuitsSummary(
        model=model,
        n_train=finetune.n_train,
        n_validation=finetune.n_test,
        n_prompts=results["prompts"].filter(pl.col("checkpoint") == 0).height,  # every checkpoint scores them all
        steps=trained.total_steps,
        lr=finetune.lr,
        rank=finetune.rank,
        epochs=finetune.epochs,
        loss_on=cfg.loss,
        trainable_params=trained.trainable_params,
        learned_threshold=LEARNED,
        **per_type,
        train_time_s=train_s,
        transcoder_layers=transcoders.height,
        transcoder_features=transcoder_meta["d_transcoder"],
        transcoder_k=transcoder_meta["k"],
        transcoder_fvu_mean=float(transcoders["fvu"].mean()),
        transcoder_fvu_max=float(transcoders["fvu"].max()),
        transcoder_fvu_min=float(transcoders["fvu"].min()),
        transcoder_worst_layer=int(transcoders.sort("fvu")["layer"][-1]),
        transcoder_dead_share_mean=float(transcoders["dead_share"].mean()),
        transcoder_train_s=transcoder_meta["train_s"],
        transcoder_tokens_per_layer=transcoder_meta["train_tokens_per_layer"],
        transcoder_eval_tokens=int(transcoders["eval_tokens"][0]) if "eval_tokens" in transcoders.columns else 0,
        transcoder_skip=bool(transcoder_meta.get("skip", False)),
        transcoder_auxk_alpha=float(transcoder_meta.get("config", {}).get("auxk_alpha", 0.0)),
        transcoder_layers_at_target=float((transcoders["fvu"] <= 0.15).mean()),
        **_checks(results),
        **_adapted(results),
        graph_prompts=graphs.filter(pl.col("checkpoint") == 0).height,  # every checkpoint traces them all
        graphs=graphs.height,
        attribution_s_median=float(pl.Series(attribution_s).median()),
        attribution_s_total=float(sum(attribution_s)),
        circuits_wall_s=circuits_wall_s,
        settle_threshold=float(results["stopping"]["threshold"][0]),
        paraphrase_overlap_min=float(results["paraphrases"]["feature_set_jaccard"].min()),
        paraphrase_overlap_max=float(results["paraphrases"]["feature_set_jaccard"].max()),
        **_seeds(results["seed_checkpoints"], results["seed_stopping"]),
        **stops,
        wall_time_s=wall_time_s,
    )
