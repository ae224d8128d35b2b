"""Two checks of an attribution graph against the model it describes, both with circuit-tracer's own machinery.

- ``account``: where the followed logit comes from, term by term. circuit-tracer's graph keeps a few hundred of
  the prompt's tens of thousands of active features and drops the direct effects of the rest, and two terms of
  the replacement model belong to no node: each transcoder's ``b_dec`` (a constant in every reconstruction) and
  the MLP output at the positions circuit-tracer zeroes (the BOS). ``account`` runs circuit-tracer's attribution
  context once more for the target logit alone (``setup_attribution``, ``run_forward_pass``, ``compute_batch``),
  which scores every active feature, every error node and every token, and a second time with the error vectors
  swapped for the nodeless terms, so that their direct effects come out of the same backward pass. The parts add up
  to the demeaned logit (the logit minus the mean logit, what circuit-tracer attributes): selected features +
  unselected features + errors + tokens + ``b_dec`` + BOS MLP + a residual that is float rounding
  (``tests/test_graph_checks.py`` checks the sum against the model's own logits, on a graph that selects only
  some of the features).
- ``intervene``: for a graph's features with the largest direct effect on the target, set the feature's
  activation to ``scale`` times itself and measure the demeaned target logit's change, once letting the change
  run through the real model (attention, MLPs, later features; the causal check: a forward hook adds the change
  of the feature's decoded output to the model's MLP output) and once with circuit-tracer's
  ``feature_intervention`` holding attention, norms and every other MLP output frozen (the direct effect only,
  which must equal the graph's prediction ``(scale - 1) x edge``: a check that the graph is read correctly).
  The whole-model measurement is a hook because circuit-tracer's unfrozen intervention re-tokenises its input
  from text, which need not give back a chat prompt's tokens.

Written here because circuit-tracer computes the full logit row inside ``attribute`` and keeps only the selected
columns.
"""

from __future__ import annotations

import torch

from lab.errors import LabError


def _mlp_io(replacement, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every layer's MLP input and output at every position: two (n_layers, n_pos, d_model) tensors."""
    from nnsight import save

    with replacement.trace(input_ids):
        ins, outs = [], []
        for i_loc, o_loc in zip(replacement.feature_input_locs, replacement.feature_output_locs, strict=True):
            ins.append(i_loc.output)
            y = o_loc.output
            outs.append(y if y.ndim == 3 else y.unsqueeze(0))
        ins = save(torch.cat(ins, dim=0))
        outs = save(torch.cat(outs, dim=0))
    return ins.detach(), outs.detach()


def _module(x):
    """The module itself where nnsight hands out its wrapper (an ``Envoy``)."""
    return getattr(x, "_module", x)


def nodeless_vectors(replacement, input_ids: torch.Tensor) -> torch.Tensor:
    """(n_layers, n_pos, d_model): what each MLP output holds that no node of circuit-tracer's graph carries:
    ``b_dec`` at the positions with feature and error nodes; at the zeroed positions (BOS) the MLP output less
    the skip connection (a linear path to earlier nodes, which the backward pass follows)."""
    ins, outs = _mlp_io(replacement, input_ids)
    tcs = _module(replacement.transcoders)
    vecs = torch.stack([tcs[layer].b_dec.detach().float().expand_as(outs[layer]) for layer in range(outs.shape[0])])
    zero = replacement.zero_positions
    bos = outs[:, zero].float()
    if tcs.skip_connection:
        bos = bos - torch.stack([tcs[layer].compute_skip(ins[layer, zero]).float() for layer in range(ins.shape[0])])
    vecs = vecs.clone()
    vecs[:, zero] = bos
    return vecs


def account(replacement, input_ids: torch.Tensor, target_id: int, selected: torch.Tensor) -> dict[str, float]:
    """The demeaned logit of ``target_id`` at the last position split by source, in logit units: ``selected``
    (indices into the prompt's active features, the graph's ``selected_features``) and the other features,
    errors, tokens, ``b_dec``, the BOS MLP output, and ``residual`` = logit minus all of them."""
    from circuit_tracer.attribution.targets import AttributionTargets

    input_ids = input_ids.reshape(-1)
    ctx = replacement.setup_attribution(input_ids)
    replacement.run_forward_pass(input_ids, 1, ctx)
    n_layers, n_pos, _ = ctx.activation_matrix.shape
    n_feat = ctx.activation_matrix._nnz()
    logits = ctx.logits[0, -1].double().cpu()
    targets = AttributionTargets(
        torch.tensor([target_id]), ctx.logits[0, -1], replacement.unembed_proj, replacement.tokenizer
    )
    at_logit = {
        "layers": torch.full((1,), n_layers),
        "positions": torch.full((1,), n_pos - 1),
        "inject_values": targets.logit_vectors,
    }
    row = ctx.compute_batch(**at_logit, retain_graph=True)[0].double()
    ctx.error_vectors = nodeless_vectors(replacement, input_ids).to(ctx.error_vectors.dtype)
    extra = ctx.compute_batch(**at_logit, retain_graph=False)[0].double()[n_feat : n_feat + n_layers * n_pos]
    extra = extra.reshape(n_layers, n_pos)
    row, extra = row.cpu(), extra.cpu()
    zero = torch.zeros(n_pos, dtype=torch.bool)
    zero[replacement.zero_positions] = True
    feats = row[:n_feat]
    chosen = torch.zeros(n_feat, dtype=torch.bool)
    chosen[selected.cpu()] = True
    parts = {
        "selected_features": float(feats[chosen].sum()),
        "unselected_features": float(feats[~chosen].sum()),
        "errors": float(row[n_feat : n_feat + n_layers * n_pos].sum()),
        "tokens": float(row[n_feat + n_layers * n_pos :].sum()),
        "b_dec": float(extra[:, ~zero].sum()),
        "bos_mlp": float(extra[:, zero].sum()),
    }
    demeaned = float(logits[target_id] - logits.mean())
    return {"demeaned_logit": demeaned, **parts, "residual": demeaned - sum(parts.values())}


def _demeaned(logits: torch.Tensor, target_id: int) -> float:
    last = logits.reshape(-1, logits.shape[-1])[-1].double().cpu()
    return float(last[target_id] - last.mean())


@torch.no_grad()
def _with_mlp_delta(model, ids: torch.Tensor, layer: int, pos: int, delta: torch.Tensor | None) -> torch.Tensor:
    """The model's last-position logits with ``delta`` added to layer ``layer``'s MLP output at ``pos``."""
    from lab.interp.harvest import mlp_modules

    def add(_m, _args, out):
        out = out.clone()
        out[:, pos] += delta.to(out.device, out.dtype)
        return out

    handle = mlp_modules(model)[layer].register_forward_hook(add) if delta is not None else None
    try:
        return model(input_ids=ids[None].to(next(model.parameters()).device)).logits[0, -1].float().cpu()
    finally:
        if handle is not None:
            handle.remove()


def intervene(replacement, model, graph, target_index: int, *, top: int = 8, scale: float = 0.0) -> list[dict]:
    """For the ``top`` selected features with the largest |direct effect| on the graph's logit ``target_index``:
    the graph's predicted change of the demeaned logit, ``(scale - 1) x edge``, and the measured ones with the
    feature's activation set to ``scale`` times itself: ``measured`` through the whole model (``model``, the
    Hugging Face model the replacement wraps, with the change ``(scale - 1) x activation x W_dec[f]`` added to
    its MLP output by a hook), ``measured_direct`` with circuit-tracer's ``feature_intervention`` holding
    attention, norms and every other MLP output frozen."""
    n_feat = len(graph.selected_features)
    n_logits = len(graph.logit_targets)
    if not 0 <= target_index < n_logits:
        raise LabError(f"intervene(target_index={target_index}): the graph has {n_logits} logits")
    target_id = graph.logit_targets[target_index].vocab_idx
    row = graph.adjacency_matrix[graph.adjacency_matrix.shape[0] - n_logits + target_index, :n_feat].double()
    ids = graph.input_tokens
    tcs = _module(replacement.transcoders)
    constrained = range(graph.cfg.n_layers)
    free0 = _demeaned(_with_mlp_delta(model, ids, 0, 0, None), target_id)
    rows = []
    for i in row.abs().argsort(descending=True)[: min(top, n_feat)].tolist():
        active = int(graph.selected_features[i])
        layer, pos, feat = (int(v) for v in graph.active_features[active])
        act = float(graph.activation_values[active])
        delta = (scale - 1.0) * act * tcs[layer].W_dec[feat].detach().float()
        free = _with_mlp_delta(model, ids, layer, pos, delta)
        frozen = replacement.feature_intervention(
            ids, [(layer, pos, feat, scale * act)], constrained_layers=constrained, freeze_attention=True
        )[0]
        rows.append(
            {
                "key": f"F{layer}.{pos}.{feat}",
                "layer": layer,
                "pos": pos,
                "feature": feat,
                "activation": act,
                "scale": scale,
                "predicted": (scale - 1.0) * float(row[i]),
                "measured": _demeaned(free, target_id) - free0,
                # frozen at the clean run's values, the unchanged model is the clean run: the same baseline
                "measured_direct": _demeaned(frozen, target_id) - free0,
            }
        )
    return rows
