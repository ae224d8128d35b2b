"""Track E's recipes: the constraint corpus, the LoRA fine-tune, the transcoders and the attribution graphs of
every profile, and the constants the analysis shares.

Inputs the track reads besides its recipe: the profile's base model (``lab.models.loading``), the profile's
pretraining corpus (part of the transcoders' training text) and, on ``gpu``, Gemma-2-2B and GemmaScope's
transcoders from the Hugging Face hub.
"""

from __future__ import annotations

from dataclasses import dataclass

from lab.data.constraints import CONSTRAINTS, held_out_prompts
from lab.errors import LabError
from lab.interp.transcoders import TranscoderConfig
from lab.profiles import Profile
from lab.train.lora import FinetuneConfig

TRACK = "E_circuits"
LEARNED = 0.9  # a constraint type counts as learned from the first checkpoint with this held-out accuracy
SEED_PROMPTS = ("Write a poem about trees", "Describe a happy day")  # the seed plan's prompts, in chat format
# circuit-tracer's JSON of the seed prompts' graphs (base and final model) is committed; at its default pruning
# (0.8 / 0.98) one graph is ~2.6 MB, at these thresholds ~0.4 MB. The metrics use the defaults (lab.interp.circuits).
JSON_NODE_THRESHOLD, JSON_EDGE_THRESHOLD = 0.6, 0.9
SETTLE_SWEEP = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)  # circuit-rule thresholds of the stopping_sweep result
LOSS_ON = ("concept", "all")


def _prompts_per_word() -> int:
    """Held-out prompts of the word with the fewest (the most ``graph_per_word`` can take from every word)."""
    counts: dict[tuple[str, str], int] = {}
    for hp in held_out_prompts():
        counts[(hp.constraint_type, hp.word)] = counts.get((hp.constraint_type, hp.word), 0) + 1
    return min(counts.values())


@dataclass(frozen=True)
class CircuitsConfig:
    """One profile's recipe: the WS2 corpus, the WS3 fine-tune and the WS1/WS5 attribution graphs."""

    per_type: int  # generated training texts per constraint type (80 % train, 20 % validation)
    finetune: FinetuneConfig  # the LoRA run; n_train / n_test are set from the corpus when the track runs
    transcoders: TranscoderConfig | None = None  # our per-layer transcoders, trained on the profile's model
    loss: str = "concept"  # "concept": loss on the concept words only; "all": on every token of the texts
    graph_words: int = 4  # invented words per constraint type whose held-out prompts get attribution graphs
    graph_per_word: int = 2  # held-out prompts per such word
    seed_prompts: int = 2  # how many of SEED_PROMPTS get graphs
    # circuit-tracer's cap on feature nodes per graph (cost grows with it: ~100 s at 1000 for a 35-token prompt
    # on 2 cores)
    max_feature_nodes: int = 300
    # circuit rule: stop once the mean feature overlap (positions dropped) with the previous checkpoint reaches this;
    # None: pre-registered from the base model, as the mean overlap of two held-out prompts of one word
    # (frames.circuit_threshold)
    settle: float | None = None
    # fine-tune seeds: the first is the main run (every result); each other one is fine-tuned on the same corpus
    # and its stopping prompts (the first held-out prompt of each graph word) traced at every checkpoint, to
    # compare both stopping rules across seeds (seed_stopping)
    seeds: tuple[int, ...] = (0,)
    # transcoders adapted to the fine-tuned model: the base model's continued for this many steps on the final
    # checkpoint's activations (0: none), at a fifth of their learning rate; the final checkpoint's graphs are traced
    # again with them (run.adapted_graphs)
    adapt_steps: int = 0
    check_top: int = 8  # intervention checks: the features with the largest direct effect per published graph
    model: str | None = None  # a hub model instead of the profile's (gpu: Gemma-2-2B, which GemmaScope covers)
    hub_transcoders: str | None = None  # circuit-tracer's hub transcoder set instead of training our own

    def __post_init__(self) -> None:
        words = min(len(w) for w in CONSTRAINTS.values())
        if self.loss not in LOSS_ON:
            raise LabError(f"CircuitsConfig.loss must be one of {', '.join(LOSS_ON)} (got {self.loss!r})")
        if self.per_type < words:
            raise LabError(
                f"CircuitsConfig.per_type={self.per_type} is too small: each of the {words} invented "
                f"words of a type needs a training text (use at least {words})"
            )
        if (self.transcoders is None) == (self.hub_transcoders is None):
            raise LabError(
                "CircuitsConfig needs exactly one of transcoders (train our own) and hub_transcoders "
                "(load circuit-tracer's set from the hub)"
            )
        if self.model is not None and self.hub_transcoders is None:
            raise LabError(
                f"CircuitsConfig.model={self.model!r} needs hub_transcoders made for it: our own "
                f"transcoders are trained on the profile's model"
            )
        if not 1 <= self.graph_words <= words:
            raise LabError(f"CircuitsConfig.graph_words must be between 1 and {words} (got {self.graph_words})")
        if not 1 <= self.graph_per_word <= (most := _prompts_per_word()):
            raise LabError(f"CircuitsConfig.graph_per_word must be between 1 and {most} (got {self.graph_per_word})")
        if not 0 <= self.seed_prompts <= len(SEED_PROMPTS):
            raise LabError(
                f"CircuitsConfig.seed_prompts must be between 0 and {len(SEED_PROMPTS)} (got {self.seed_prompts})"
            )
        if self.max_feature_nodes < 1:
            raise LabError(f"CircuitsConfig.max_feature_nodes must be at least 1 (got {self.max_feature_nodes})")
        if self.settle is not None and not 0 < self.settle <= 1:
            raise LabError(f"CircuitsConfig.settle is a Jaccard threshold in (0, 1] or None (got {self.settle})")
        if self.settle is None and self.graph_per_word < 2:
            raise LabError(
                "CircuitsConfig.settle=None sets the threshold from pairs of prompts of one word: graph_per_word "
                f"must be at least 2 (got {self.graph_per_word}), or fix settle"
            )
        if self.adapt_steps < 0 or (self.adapt_steps and self.transcoders is None):
            raise LabError(
                f"CircuitsConfig.adapt_steps={self.adapt_steps}: must be >= 0, and 0 with hub transcoders (the "
                f"lab adapts only transcoders it trained)"
            )
        if self.check_top < 1:
            raise LabError(f"CircuitsConfig.check_top must be at least 1 (got {self.check_top})")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or any(s < 0 for s in self.seeds):
            raise LabError(f"CircuitsConfig.seeds must be distinct seeds >= 0, at least one (got {self.seeds})")


RECIPES: dict[str, CircuitsConfig] = {
    # The tiny random Llama: every code path in seconds; nothing is learned.
    "smoke": CircuitsConfig(
        per_type=8,
        finetune=FinetuneConfig(lr=2e-3, rank=4, batch_size=4, epochs=2, max_seq_len=128, n_evals=2),
        transcoders=TranscoderConfig(
            d_transcoder=128,
            k=8,
            steps=60,
            batch_seqs=8,
            seq_len=32,
            lr=3e-3,
            eval_seqs=16,
            skip=True,
            auxk_alpha=1 / 32,
            dead_tokens=512,
        ),
        graph_words=1,  # 1 word x 2 prompts per type + 1 seed prompt: 5 graphs per checkpoint
        graph_per_word=2,
        seeds=(0, 1),
        adapt_steps=20,
        check_top=2,
        seed_prompts=1,
        max_feature_nodes=100,
    ),
    # SmolLM2-135M-Instruct on 2 CPU cores.
    "cpu": CircuitsConfig(
        seeds=(0, 1, 2),
        adapt_steps=100,  # 204,800 tokens of the fine-tuned model: ~7 minutes
        # 51 training texts (80 % of 64), 10 epochs of batch 8: 70 steps. A first run with the loss on every token
        # and 5 epochs learned the sentence templates and left held-out accuracy at chance.
        per_type=32,
        finetune=FinetuneConfig(lr=1e-3, rank=8, batch_size=8, epochs=10, max_seq_len=64, n_evals=4),
        # 30 layers, d_model 576 -> 4x expansion; 1000 steps x 16 x 128 = 2,048,000 tokens per layer, 102,400
        # held-out. Skip connection and AuxK as in EleutherAI's sparsify (alpha 1/32, k_aux = d_model / 2), AuxK on a
        # quarter of each batch's tokens. k 64, not sparsify's 32, and LR 5e-3: in a pilot on layers 11, 20 and 29
        # (500k tokens) k 64 gave held-out FVU 0.13 mean against 0.20 at k 32, and LR 2e-3 0.34 (layer 11 is the
        # hard one: 0.22 / 0.44 / 0.84). About 70-80 minutes on 2 CPU cores, the harvest alone ~30.
        transcoders=TranscoderConfig(
            d_transcoder=2304,
            k=64,
            steps=1000,
            batch_seqs=16,
            seq_len=128,
            lr=5e-3,
            eval_seqs=800,
            skip=True,
            auxk_alpha=1 / 32,
            dead_tokens=50_000,
            aux_tokens=512,
        ),
    ),
    # Gemma-2-2B in bf16 (merging LoRA into 4-bit weights is lossy) with GemmaScope transcoders from the hub,
    # per the seed plan. Written for a CUDA machine with hub access; not run in this project yet.
    "gpu": CircuitsConfig(
        seeds=(0, 1, 2),
        per_type=64,
        finetune=FinetuneConfig(lr=2e-4, rank=16, batch_size=16, epochs=5, max_seq_len=64, n_evals=4),
        max_feature_nodes=4096,
        model="google/gemma-2-2b",
        hub_transcoders="gemma",  # GemmaScope's transcoders, as circuit-tracer names them
    ),
}


def config_for(profile: Profile) -> CircuitsConfig:
    """The track's recipe for ``profile``."""
    if profile.name not in RECIPES:
        raise LabError(f"track {TRACK} has no recipe for profile {profile.name!r} (have {', '.join(RECIPES)})")
    return RECIPES[profile.name]
