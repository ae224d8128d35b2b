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
        q = dataclasses.replace(p, threads=7)
        assert q.threads == 7 and p.threads is None and q.name == "cpu"

    def test_activate_sets_threads(self):
        import torch

        from lab.profiles import activate

        before = torch.get_num_threads()
        try:
            assert activate(dataclasses.replace(get_profile("smoke"), threads=2)).threads == 2
            assert torch.get_num_threads() == 2
        finally:
            torch.set_num_threads(before)


class TestDevice:
    """A profile whose device this machine lacks is refused when it is activated, before any compute."""

    def test_gpu_profile_without_cuda_names_the_fix(self, monkeypatch):
        import torch

        from lab.profiles import activate

        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        with pytest.raises(LabError) as err:
            activate(get_profile("gpu"))
        assert str(err.value) == (
            "profile 'gpu' runs on a CUDA GPU and this machine has none (torch.cuda.is_available() is False): "
            "use --profile cpu"
        )

    def test_gpu_profile_with_cuda_is_accepted(self, monkeypatch):
        import torch

        from lab.profiles import activate

        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        assert activate(get_profile("gpu")).require_device() == "cuda"

    @pytest.mark.parametrize("name", ["smoke", "cpu"])
    def test_cpu_profiles_never_ask_for_cuda(self, name, monkeypatch):
        import torch

        def asked():
            raise AssertionError("a CPU profile asked whether CUDA is there")

        monkeypatch.setattr(torch.cuda, "is_available", asked)
        assert get_profile(name).require_device() == "cpu"

    def test_unknown_device(self):
        with pytest.raises(LabError, match=r"names the device 'tpu': the lab runs on 'cpu' or 'cuda'"):
            dataclasses.replace(get_profile("cpu"), device="tpu").require_device()
