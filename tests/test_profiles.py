"""Profiles: selection by name, errors, immutability."""

import dataclasses

import pytest

from lab.errors import LabError
from lab.profiles import PROFILES, get_profile


class TestProfiles:
    """Profiles are frozen dataclasses chosen by name."""

    def test_default_is_cpu(self):
        assert get_profile().name == "cpu"
        assert get_profile(None) is PROFILES["cpu"]

    @pytest.mark.parametrize("name", ["smoke", "cpu", "gpu"])
    def test_by_name(self, name):
        assert get_profile(name).name == name

    def test_unknown_lists_valid_names(self):
        with pytest.raises(LabError) as e:
            get_profile("laptop")
        msg = str(e.value)
        assert "'laptop'" in msg and all(n in msg for n in ("smoke", "cpu", "gpu"))

    def test_frozen_and_replace(self):
        p = get_profile("cpu")
        with pytest.raises(dataclasses.FrozenInstanceError):
            p.name = "x"
        q = dataclasses.replace(p.pretrain, max_iters=7)
        assert q.max_iters == 7 and p.pretrain.max_iters == 2000

    def test_cpu_pretrain_is_nanogpt_cpu_recipe(self):
        c = get_profile("cpu").pretrain
        assert (c.n_layer, c.d_model, c.n_head, c.block_size, c.batch_size, c.max_iters) == (4, 128, 4, 64, 12, 2000)
        assert (c.lr, c.min_lr, c.warmup_iters) == (1e-3, 1e-4, 100)
        assert c.pos_emb == "rope"  # our one documented change (the track measures learned too)
