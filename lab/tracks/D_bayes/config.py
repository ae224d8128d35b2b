"""Track D's recipes (one per profile), the paper's reference numbers, and the config dataclasses that hold them.

A recipe names the headline transformer (trained on every seed), the two controls (a context-blind MLP and an
LSTM, sized to the headline's parameter count), the configurations of the small search, and the analysis batch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from lab.data.windtunnel import check_V, n_pairs, uniform_floor_bits
from lab.errors import LabError
from lab.models.windtunnel import ModelSpec
from lab.profiles import Profile
from lab.train.em_attention import EMConfig
from lab.train.windtunnel import TrainConfig

TRACK = "D_bayes"  # the results folder, results/D_bayes/

# ----------------------------------------------------------------------------- what the paper reports
# "The Bayesian Geometry of Transformer Attention" (Aggarwal, Dalal & Misra, arXiv:2512.22471); the numbers as
# collected in /work/shared/PAPER_BAYES.md. Table cells avoid parentheses: the site's cell escaping turns "(...)"
# into "\(...\)", which KaTeX renders as math.

# Entropy MAE in bits on the bijection task at V=20: the public repository's README
# (github.com/vishalmisra/bayesian-wind-tunnel), cited on the page.
PAPER_MAE = {"transformer": 0.007, "lstm": 0.009, "mlp": 1.85}
PAPER_MODEL = "6 layers, 6 heads, d=192, 2.69M parameters"
# The authors' learning curve of that model (step, entropy MAE), as collected in our reference notes.
PAPER_CURVE = (
    (100, 2.82),
    (200, 0.78),
    (500, 0.65),
    (1000, 0.086),
    (2000, 0.043),
    (5000, 0.023),
    (10_000, 0.0093),
    (20_000, 0.005),
    (50_000, 0.0008),
)
PAPER_HEAD_ABLATION = (0.11, 0.15)  # authors' later note: cost of ablating any one layer-0 head, bits
PAPER_KEY_COS = (0.052, 0.082)  # mean |cos| of layer-0 keys, trained vs random init (second-hand summary)
PAPER_PC1_MIN = 0.80  # the authors' reproduction checklist: PC1 explains > 80 % of the variance
PAPER_KEY_COS_MAX = 0.1  # ... and layer-0 off-diagonal cosine < 0.1

# The authors' README, rows beyond the bijection's transformer/LSTM/MLP (PAPER_MAE).
PAPER_MAMBA = 0.010  # bijection, Mamba
PAPER_HMM = 7.5e-5  # HMM filtering at K = 20, transformer ("per-position")
PAPER_HMM_MAMBA = 0.024
PAPER_HMM_LONG = 0.029  # the same model extrapolated to K = 50
PAPER_EM_SPEEDUP = 2.3  # EM-like schedule against SGD, single head (README; ~430 vs 1000 steps)
PAPER_JLENS_MLP = 1.107  # the authors' later MLP control (experiments/jlens/RESULTS.md)
PAPER_LSTM_MODEL = "6 layers, width 192, 1.8M params, 50k steps"
PAPER_HMM_MODEL = "9 layers, width 256"

POINTS_MAX = 5000  # Altair refuses to embed more rows than this in one chart


@dataclass(frozen=True)
class Candidate:
    """One configuration of the search: a label, a transformer and its optimisation."""

    label: str  # how the search table and chart name it
    model: ModelSpec  # a transformer: the mechanistic analyses read its attention
    train: TrainConfig

    def __post_init__(self) -> None:
        if not self.label:
            raise LabError("a search candidate needs a label (the search table's row name)")
        if self.model.kind != "transformer":
            raise LabError(
                f"search candidate {self.label!r} is a {self.model.kind}: the search compares "
                "transformers only; the MLP and LSTM controls have their own fields"
            )


@dataclass(frozen=True)
class HMMConfig:
    """The HMM wind tunnel's run (:mod:`lab.data.hmm`): one transformer trained at ``K`` observations, evaluated
    there and at ``K_long``."""

    model: ModelSpec
    train: TrainConfig
    K: int = 20  # the authors' training length
    K_long: int = 50  # ... and their extrapolation length
    seed: int = 0


@dataclass(frozen=True)
class BayesTrackConfig:
    """Everything the track runs on one profile."""

    V: int  # values per bijection (20 in the paper): sequences of 2V-3 tokens, V-1 predictions each
    headline: Candidate  # trained on every seed; the headline number
    seeds: tuple[int, ...]  # seeds of the headline; the controls and the search train on the first
    mlp: ModelSpec  # context-blind control, sized to the headline transformer's parameter count
    lstm: ModelSpec | None  # recurrent control, sized the same way; None skips it
    controls_train: TrainConfig  # optimisation of both controls
    search: tuple[Candidate, ...]  # trained on the first seed; the headline must be among them
    ladder: tuple[Candidate, ...] = ()  # the scale ladder, smallest first; the headline may be a rung (seeds reused)
    ladder_seeds: tuple[int, ...] = (0, 1)  # seeds of every other rung
    lstm_lrs: tuple[float, ...] = ()  # the LSTM's own learning-rate sweep at controls_train; the best is the control
    hmm: HMMConfig | None = None  # the HMM wind tunnel; None skips it
    em: EMConfig | None = None  # Paper II's EM-like update against SGD; None skips it
    em_seeds: tuple[int, ...] = (42, 2024, 1337, 7777, 9999)  # the authors' seeds
    target_mae: float = 0.02  # bits: the hypothesis' bar for every seed
    target_train_s: float = 600.0  # seconds of training in which each seed should reach target_mae
    analysis_sequences: int = 2048  # fresh sequences (no run trains on them) for calibration and mechanisms
    analysis_seed: int = 777  # seeds that batch
    points_sequences: int = 150  # sequences in the PCA scatter (x V-1 points; Altair caps charts at 5000 rows)

    def __post_init__(self) -> None:
        try:
            check_V(self.V)
        except LabError as err:
            raise LabError(f"BayesTrackConfig.V: {err}") from None
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise LabError(f"BayesTrackConfig.seeds must be distinct and at least one, got {self.seeds!r}")
        if self.headline not in self.search:
            raise LabError("the headline configuration must be one of the search candidates: add it to `search`")
        if any(c.model.kind != "transformer" for c in self.ladder) or len({c.label for c in self.ladder}) != len(
            self.ladder
        ):
            raise LabError("the scale ladder's rungs must be transformers with distinct labels")
        if self.lstm_lrs and self.lstm is None:
            raise LabError("lstm_lrs sweeps the LSTM control's learning rate: give `lstm` too, or no lstm_lrs")
        if self.mlp.kind != "mlp" or (self.lstm is not None and self.lstm.kind != "lstm"):
            raise LabError(
                f"the controls must be ModelSpec('mlp', ...) and ModelSpec('lstm', ...) or None, got "
                f"{self.mlp.kind!r} and {self.lstm.kind if self.lstm else None!r}"
            )
        if self.target_mae <= 0 or self.target_train_s <= 0:
            raise LabError(
                f"target_mae and target_train_s must be positive, got {self.target_mae}, {self.target_train_s}"
            )
        if self.analysis_sequences < 1 or self.points_sequences < 1:
            raise LabError(
                f"analysis_sequences and points_sequences must be at least 1, got "
                f"{self.analysis_sequences}, {self.points_sequences}"
            )
        if self.points_sequences * n_pairs(self.V) > POINTS_MAX:
            raise LabError(
                f"points_sequences={self.points_sequences} gives {self.points_sequences * n_pairs(self.V)} "
                f"PCA points, over Altair's {POINTS_MAX}: lower it to "
                f"{POINTS_MAX // n_pairs(self.V)} or less"
            )

    @property
    def floor_bits(self) -> float:
        """The entropy MAE of a context-blind uniform guess at this V (bits): what the MLP control cannot beat."""
        return uniform_floor_bits(self.V)

    def record(self, device: str) -> dict[str, Any]:
        """The config as the results' provenance stores it."""
        return {
            "V": self.V,
            "headline": asdict(self.headline),
            "seeds": list(self.seeds),
            "mlp": asdict(self.mlp),
            "lstm": asdict(self.lstm) if self.lstm else None,
            "controls_train": asdict(self.controls_train),
            "search": [asdict(c) for c in self.search],
            "ladder": [asdict(c) for c in self.ladder],
            "ladder_seeds": list(self.ladder_seeds),
            "lstm_lrs": list(self.lstm_lrs),
            "hmm": asdict(self.hmm) if self.hmm else None,
            "em": asdict(self.em) if self.em else None,
            "em_seeds": list(self.em_seeds),
            "analysis_sequences": self.analysis_sequences,
            "analysis_seed": self.analysis_seed,
            "device": device,
        }


# ----------------------------------------------------------------------------- recipes


def _smoke() -> BayesTrackConfig:
    # Seconds: V=6, a 2-layer width-16 transformer for 40 steps, and a 1-layer one in the search.
    tf = ModelSpec("transformer", n_layer=2, n_head=2, d_model=16)
    tc = TrainConfig(steps=40, batch_size=32, lr=3e-3, warmup=5, eval_every=10, eval_sequences=128)
    head = Candidate("smoke 2L d16", tf, tc)
    return BayesTrackConfig(
        V=6,
        headline=head,
        seeds=(0, 1, 2),
        mlp=ModelSpec("mlp", n_layer=2, d_model=16),
        lstm=ModelSpec("lstm", n_layer=1, d_model=16),
        controls_train=replace(tc, steps=20),
        search=(head, Candidate("smoke 1L d16", replace(tf, n_layer=1), replace(tc, steps=20))),
        ladder=(Candidate("smoke 1L d8", ModelSpec("transformer", 1, 2, 8), replace(tc, steps=20)), head),
        lstm_lrs=(3e-3, 1e-2),
        hmm=HMMConfig(
            ModelSpec("transformer", n_layer=1, n_head=2, d_model=16),
            replace(tc, steps=10, eval_every=5, eval_sequences=32),
            K=3,
            K_long=5,
        ),
        em=EMConfig(T=48, steps=30, log_every=5),
        em_seeds=(1, 2),
        analysis_sequences=128,
        points_sequences=20,
    )


def _cpu() -> BayesTrackConfig:
    # The first pass's search found 2 layers, width 64, LR 2e-3 without weight decay; at 8k steps three seeds gave
    # 0.0107 bits. Nearly all of what remains is probability leaked onto revealed values, which falls slowly (a
    # 20k-step pilot: 0.0058 bits, of which 0.0002 without the leak), so the headline trains 30k steps on two
    # seeds. bf16 autocast + compile steps it ~2x faster on these cores. A 6-layer width-96 pilot (1e-3, 6k steps)
    # sat at 0.016 bits: larger models are not faster per step here, so the ladder compares sizes at 4k steps.
    fast = dict(precision="bf16", compile=True)
    tf = ModelSpec("transformer", n_layer=2, n_head=4, d_model=64)
    tc = TrainConfig(steps=30_000, lr=2e-3, weight_decay=0.0, min_lr_frac=0.01, eval_every=500, **fast)  # batch 128
    head = Candidate("2L d64, LR 2e-3, no WD, 30k steps", tf, tc)
    rung = replace(tc, steps=4000, eval_every=250)
    return BayesTrackConfig(
        V=20,
        headline=head,
        seeds=(0, 1),
        mlp=ModelSpec("mlp", n_layer=2, d_model=64),
        lstm=ModelSpec("lstm", n_layer=1, d_model=64),
        controls_train=replace(tc, steps=6000, eval_every=250),
        search=(head, Candidate("2L d64, LR 2e-3, no WD, 8k steps", tf, replace(tc, steps=8000, eval_every=250))),
        ladder=tuple(
            Candidate(f"{n}L d{d}", ModelSpec("transformer", n_layer=n, n_head=4, d_model=d), rung)
            for n, d in ((2, 32), (2, 64), (4, 64), (4, 96))
        ),
        ladder_seeds=(0, 1),
        lstm_lrs=(3e-3, 1e-2),
        hmm=HMMConfig(
            ModelSpec("transformer", n_layer=4, n_head=4, d_model=64),
            TrainConfig(
                steps=4000, batch_size=64, lr=1e-3, weight_decay=0.0, min_lr_frac=0.05, eval_sequences=512, **fast
            ),
        ),
        em=EMConfig(),
    )


def _gpu() -> BayesTrackConfig:
    # The paper's model and recipe: 6 layers, 6 heads, d 192 (FFN 768), batch 256, AdamW 3e-4, weight decay 0.1,
    # 2000 warmup steps then cosine, clip 1.0 (we keep LayerNorm where the paper uses RMSNorm).
    tf = ModelSpec("transformer", n_layer=6, n_head=6, d_model=192)
    tc = TrainConfig(
        steps=50_000, batch_size=256, lr=3e-4, warmup=2000, min_lr_frac=0.1, eval_every=1000, eval_sequences=4096
    )
    head = Candidate("paper size: 6L d192, 50k steps", tf, tc)
    return BayesTrackConfig(
        V=20,
        headline=head,
        seeds=(0, 1, 2),
        mlp=ModelSpec("mlp", n_layer=6, d_model=192),
        lstm=ModelSpec("lstm", n_layer=2, d_model=192),
        controls_train=replace(tc, steps=10_000),
        search=(head,),
        target_train_s=float("inf"),  # no time budget on a GPU
        analysis_sequences=4096,
        em=EMConfig(),
    )


RECIPES: dict[str, BayesTrackConfig] = {"smoke": _smoke(), "cpu": _cpu(), "gpu": _gpu()}


def config_for(profile: Profile) -> BayesTrackConfig:
    """The track's configuration for a profile."""
    if profile.name not in RECIPES:
        raise LabError(f"track {TRACK} has no recipe for profile {profile.name!r} (have {', '.join(RECIPES)})")
    return RECIPES[profile.name]


def custom_candidate(cfg: BayesTrackConfig, *, n_layer: int, d_model: int, lr: float, steps: int) -> Candidate:
    """The notebook's "train your own" transformer: 4 heads from width 32 (2 below), the profile's evaluation set,
    20 evaluations along the way."""
    model = ModelSpec("transformer", n_layer=n_layer, n_head=4 if d_model >= 32 else 2, d_model=d_model)
    train = TrainConfig(
        steps=steps,
        lr=lr,
        min_lr_frac=0.01,
        eval_every=max(10, steps // 20),
        eval_sequences=cfg.headline.train.eval_sequences,
    )
    return Candidate(f"notebook {n_layer}L d{d_model}", model, train)
