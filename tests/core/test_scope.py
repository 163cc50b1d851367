"""Scope: the targeting grammar, skip reasons, and model-level policies."""

from __future__ import annotations

import pytest
from torch import nn

from slimkit.core.policy import POLICIES, Latency1x1Policy, make_policy
from slimkit.core.scope import Scope, module_type_name
from slimkit.errors import ConfigError, ScopeError, UnsupportedModuleError
from slimkit.prune import MagnitudePruning, MagnitudePruningConfig


def supports(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear | nn.Conv2d)


class Net(nn.Module):
    """stem 3x3 conv, BatchNorm, a pointwise / depthwise 3x3 / grouped 1x1 conv, Embedding, fc."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.layer1 = nn.Sequential(
            nn.Conv2d(8, 8, 1),
            nn.Conv2d(8, 8, 3, padding=1, groups=8),
            nn.Conv2d(8, 8, 1, groups=8),
        )
        self.emb = nn.Embedding(10, 8)
        self.fc = nn.Linear(8, 4)


def select(model: nn.Module | None = None, **scope: object):
    return Scope(**scope).select(
        model or Net(), supports, technique="prune", describe_supported="Linear, Conv2d"
    )


@pytest.mark.parametrize(
    ("include", "expected"),
    [
        (("fc",), ["fc"]),
        (("stem", "fc"), ["stem", "fc"]),
        (("layer1.*",), ["layer1.0", "layer1.1", "layer1.2"]),
        (("*.1",), ["layer1.1"]),
        ((r"re:layer1\.[02]",), ["layer1.0", "layer1.2"]),
        (("re:s.*",), ["stem"]),
        (("type:Conv2d",), ["stem", "layer1.0", "layer1.1", "layer1.2"]),
        (("type:torch.nn.Linear",), ["fc"]),
        (("type:torch.nn.Conv2d",), ["stem", "layer1.0", "layer1.1", "layer1.2"]),
        (("type:torch.nn.modules.linear.Linear",), ["fc"]),
        (("type:_ConvNd",), ["stem", "layer1.0", "layer1.1", "layer1.2"]),
    ],
    ids=lambda value: ",".join(value) if isinstance(value, tuple) else "",
)
def test_include_rules_select_exactly(include: tuple[str, ...], expected: list[str]) -> None:
    assert select(include=include).names == expected


def test_regex_rules_match_the_whole_name() -> None:
    # "re:layer1" names only the Sequential container, which prune cannot handle.
    with pytest.raises(ScopeError, match="'re:layer1' matches only modules it cannot handle"):
        select(include=("re:layer1",))


def test_exclude_wins_over_include_and_the_reason_is_recorded() -> None:
    selection = select(include=("*",), exclude=("layer1.*", "stem"))
    assert selection.names == ["fc"]
    skipped = dict(selection.skipped)
    assert skipped["layer1.0"] == "excluded by rule 'layer1.*'"
    assert skipped["layer1.2"] == "excluded by rule 'layer1.*'"
    assert skipped["stem"] == "excluded by rule 'stem'"


def test_default_scope_skips_matrix_owners_with_a_reason_but_not_norm_layers() -> None:
    selection = select()
    assert selection.names == ["stem", "layer1.0", "layer1.1", "layer1.2", "fc"]
    assert selection.skipped == [("emb", "Embedding is not supported by prune")]


@pytest.mark.parametrize(
    ("scope", "rule", "closest"),
    [
        ({"include": ("fcc",)}, "fcc", "fc"),
        ({"include": ("layer1.9",)}, "layer1.9", "layer1.0"),
        ({"exclude": ("stemm",)}, "stemm", "stem"),
        ({"include": ("type:Conv3d",)}, "type:Conv3d", None),
    ],
)
def test_a_rule_matching_nothing_is_an_error_listing_closest_names(
    scope: dict[str, tuple[str, ...]], rule: str, closest: str | None
) -> None:
    with pytest.raises(ScopeError) as info:
        select(**scope)
    message = str(info.value)
    assert message.startswith(f"prune: rule {rule!r} matches no module")
    if closest is not None:
        assert "closest names: " in message
        assert closest in message.split("closest names: ")[1].split(", ")


def test_exact_rule_on_an_unsupported_module_names_it() -> None:
    with pytest.raises(UnsupportedModuleError) as info:
        select(include=("fc", "bn"))
    assert str(info.value) == (
        "prune: module 'bn' (BatchNorm2d) is not supported; supported: Linear, Conv2d"
    )
    assert isinstance(info.value, TypeError)


def test_glob_matching_only_unsupported_modules_is_an_error() -> None:
    with pytest.raises(ScopeError, match=r"rule 'b\*' matches only modules it cannot handle"):
        select(include=("fc", "b*"))


@pytest.mark.parametrize(
    ("rule", "fragment"),
    [("re:layer[", "invalid regex in rule 're:layer['"), ("", "empty"), ("type:", "names no type")],
)
def test_malformed_rules_are_rejected_at_construction(rule: str, fragment: str) -> None:
    with pytest.raises(ScopeError, match=fragment.replace("[", r"\[")):
        Scope(include=(rule,))
    with pytest.raises(ScopeError):
        Scope(exclude=(rule,))


def test_latency_1x1_policy_selects_pointwise_convs_and_linear_only() -> None:
    selection = select(policy="latency_1x1")
    assert selection.names == ["layer1.0", "fc"]
    skipped = dict(selection.skipped)
    assert skipped["stem"] == "policy 'latency_1x1': kernel (3, 3) is not 1x1"
    assert skipped["layer1.1"] == "policy 'latency_1x1': kernel (3, 3) is not 1x1"
    assert skipped["layer1.2"] == "policy 'latency_1x1': grouped convolution (groups=8)"
    assert "bn" not in skipped


def test_latency_1x1_policy_refuses_a_model_without_eligible_modules() -> None:
    model = nn.Sequential()
    model.add_module("conv_a", nn.Conv2d(3, 8, 3))
    model.add_module("conv_dw", nn.Conv2d(8, 8, 1, groups=8))
    with pytest.raises(UnsupportedModuleError) as info:
        select(model, policy="latency_1x1")
    message = str(info.value)
    assert "allows no module of Sequential" in message
    assert "conv_a (policy 'latency_1x1': kernel (3, 3) is not 1x1)" in message
    assert "conv_dw (policy 'latency_1x1': grouped convolution (groups=8))" in message


def test_policy_refusal_and_allows_agree() -> None:
    policy = Latency1x1Policy()
    assert policy.allows("fc", nn.Linear(2, 2))
    assert not policy.allows("c", nn.Conv2d(2, 2, 3))
    assert (
        policy.refusal("n", nn.LayerNorm(2)) == "LayerNorm is neither a 1x1 convolution nor Linear"
    )


@pytest.mark.parametrize("build", [lambda: Scope(policy="fast"), lambda: make_policy("fast")])
def test_unknown_policy_lists_valid_names(build) -> None:
    with pytest.raises(ConfigError) as info:
        build()
    assert "unknown policy 'fast'; expected one of: all, latency_1x1" in str(info.value)
    assert sorted(POLICIES) == ["all", "latency_1x1"]


def test_scope_applies_to_a_real_technique_and_reports_plain_type_names() -> None:
    model = Net()
    technique = MagnitudePruning(
        MagnitudePruningConfig(sparsity=0.5, scope=Scope(include=("type:torch.nn.Linear",)))
    )
    technique.apply(model)
    assert technique.step(0)  # a one-shot schedule acts at step 0
    assert technique.selection is not None and technique.selection.names == ["fc"]
    assert type(model.fc).__name__ != "Linear"  # parametrized subclass
    assert module_type_name(model.fc) == "Linear"
    assert float((model.fc.weight == 0).float().mean()) == pytest.approx(0.5)
    assert bool((model.stem.weight != 0).all())
