"""The framework-independent half of the integrations (no Lightning or Trainer needed)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimkit.core.compressor import Compressor
from slimkit.errors import ConfigError, StateError
from slimkit.integrations._common import CompressorDriver, make_compressor, require, shorten
from slimkit.prune import MagnitudePruning, MagnitudePruningConfig
from slimkit.quant import QATConfig


class Wrapper(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))


def test_missing_package_is_a_one_line_config_error() -> None:
    with pytest.raises(ConfigError, match=r"needs some-package .*: pip install some-package$"):
        require("slimkit_no_such_module", "some-package", "slimkit.integrations.x")


def test_make_compressor_accepts_what_the_callbacks_document() -> None:
    ready = Compressor([MagnitudePruningConfig(sparsity=0.5)])
    assert make_compressor(ready) is ready
    assert [t.kind for t in make_compressor(MagnitudePruningConfig(sparsity=0.5)).techniques] == [
        "magnitude_prune"
    ]
    technique = MagnitudePruning(MagnitudePruningConfig(sparsity=0.5))
    assert make_compressor([technique]).techniques == [technique]
    with pytest.raises(ConfigError, match="give them to Compressor"):
        make_compressor(ready, example_inputs=torch.zeros(1, 8))
    with pytest.raises(ConfigError, match="got dict"):
        make_compressor({"kind": "magnitude_prune"})


def test_driver_applies_to_a_submodule_and_names_the_parameters_it_added() -> None:
    root = Wrapper()
    driver = CompressorDriver(QATConfig(), submodule="model")
    assert driver.attach(root) and not driver.attach(root)  # applied once
    assert driver.compressor.model is root.model
    optimizer = torch.optim.SGD(root.parameters(), lr=0.1)
    assert driver.missing_parameters([optimizer]) == []
    stale = torch.optim.SGD([root.model[0].bias], lr=0.1)
    missing = driver.missing_parameters([stale])
    assert missing[0] == "model.0.parametrizations.weight.0.scale" and len(missing) == 4
    with pytest.raises(StateError, match="another model"):
        driver.attach(Wrapper())
    with pytest.raises(ConfigError, match="submodule 'nope' not found in Wrapper"):
        CompressorDriver(QATConfig(), submodule="nope").attach(Wrapper())


def test_scalars_are_prefixed_by_kind_and_index_for_repeated_kinds() -> None:
    driver = CompressorDriver(
        [
            MagnitudePruningConfig(sparsity=0.5, scope={"include": ["0"]}),
            MagnitudePruningConfig(sparsity=0.25, scope={"include": ["2"]}),
        ]
    )
    assert driver.scalars() == {}  # not applied yet
    driver.attach(Wrapper().model)
    scalars = driver.scalars()
    assert scalars["magnitude_prune.0/sparsity/overall"] == 0.5
    assert scalars["magnitude_prune.1/sparsity/overall"] == 0.25
    only_first = driver.scalars([driver.compressor.techniques[0]])
    assert all(key.startswith("magnitude_prune.0/") for key in only_first)


def test_training_loss_and_state_round_trip() -> None:
    driver = CompressorDriver(MagnitudePruningConfig(sparsity=0.5))
    task = torch.tensor(2.0)
    assert float(driver.training_loss(task)) == 2.0
    with pytest.raises(StateError, match="not applied"):
        driver.load_state_dict({"version": 1, "finalized": False, "compressor": {}})
    driver.attach(Wrapper().model)
    state = driver.state_dict()
    other = CompressorDriver(MagnitudePruningConfig(sparsity=0.5))
    other.attach(Wrapper().model)
    other.load_state_dict(state)
    assert other.compressor.state_dict() == driver.compressor.state_dict()
    driver.finalize_at_end = True
    assert isinstance(driver.end(), nn.Sequential)
    with pytest.raises(StateError, match="after the compressor was finalized"):
        other.load_state_dict(driver.state_dict())
    with pytest.raises(StateError, match="version"):
        other.load_state_dict({"version": 99})


def test_shorten() -> None:
    assert shorten(["a", "b"]) == "a, b"
    assert shorten(list("abcdef")) == "a, b, c, d and 2 more"
