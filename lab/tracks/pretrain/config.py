"""The pretraining track's recipes: one :class:`~lab.train.pretraining.PretrainConfig` per profile.

Every field not written here keeps the library default, which is nanoGPT's CPU recipe (see
``PretrainConfig``). The one deliberate change from nanoGPT is rotary position embeddings (``pos_emb="rope"``):
on our held-out plays nanoGPT's learned absolute embeddings reach val 1.95 in 2000 steps, RoPE 1.83, and the
track trains the recipe once more with ``pos_emb="learned"`` to show it (``ablation.parquet``).
"""

from __future__ import annotations

from lab.errors import LabError
from lab.profiles import Profile
from lab.train.pretraining import PretrainConfig

TRACK = "pretrain"

# nanoGPT README (Karpathy), CPU run of config/train_shakespeare_char.py: validation loss 1.88 nats/char.
NANOGPT_CPU_VAL_LOSS = 1.88

RECIPES: dict[str, PretrainConfig] = {
    # seconds on one thread: a 2-layer model on the generated smoke text, evaluated and checkpointed often
    "smoke": PretrainConfig(
        n_layer=2,
        n_head=2,
        d_model=32,
        block_size=32,
        batch_size=8,
        max_iters=200,
        lr=3e-3,
        min_lr=3e-4,
        warmup_iters=10,
        eval_interval=50,
        eval_iters=4,
        final_eval_iters=8,
        checkpoint_interval=50,
        sample_chars=60,
    ),
    # nanoGPT's CPU recipe on 2 cores (4 layers, d 128, 4 heads, block 64, batch 12, 2000 steps, lr 1e-3 -> 1e-4)
    "cpu": PretrainConfig(
        compile=True,  # torch.compile: ~31 instead of ~43 ms/step on 2 cores, after ~30 s of compiling
    ),
    # nanoGPT's train_shakespeare_char.py (GPU) recipe
    "gpu": PretrainConfig(
        n_layer=6,
        n_head=6,
        d_model=384,
        block_size=256,
        batch_size=64,
        max_iters=5000,
        dropout=0.2,
        min_lr=1e-4,
        eval_interval=250,
        eval_iters=200,
        checkpoint_interval=1000,
        compile=True,
    ),
}


def config_for(profile: Profile) -> PretrainConfig:
    """The pretraining recipe of ``profile``."""
    try:
        return RECIPES[profile.name]
    except KeyError:
        raise LabError(
            f"the pretrain track has no recipe for profile {profile.name!r}: add one to RECIPES in "
            f"lab/tracks/pretrain/config.py (known: {', '.join(RECIPES)})"
        ) from None
