"""Routing modes are declared once: the policy registry, the settings and the wire enum agree."""

from __future__ import annotations

import random

import pytest

from tokenyard.api.router.v1 import router_pb2
from tokenyard.common.errors import InvalidArgument
from tokenyard.router.config import RouterSettings
from tokenyard.router.policies import POLICIES, RoutingMode, make_policy
from tokenyard.router.servicer import MODE_ENUMS, MODE_NAMES, hints_from_pb

pytestmark = pytest.mark.unit


def test_every_mode_has_a_policy_named_after_it() -> None:
    assert set(POLICIES) == set(RoutingMode)
    for mode in RoutingMode:
        assert make_policy(mode, random.Random(0)).name() == mode
        assert make_policy(mode.value).name() == mode


def test_the_wire_enum_and_the_modes_agree_both_ways() -> None:
    wire = {v for v in router_pb2.RoutingMode.values() if v != router_pb2.ROUTING_MODE_UNSPECIFIED}
    assert set(MODE_NAMES) == wire, "a RoutingMode value of the proto has no policy"
    assert set(MODE_ENUMS) == set(RoutingMode)
    for mode in RoutingMode:
        assert router_pb2.RoutingMode.Name(MODE_ENUMS[mode]) == f"ROUTING_MODE_{mode.name}"
        assert hints_from_pb(router_pb2.RouteHints(mode=MODE_ENUMS[mode])).mode == mode


def test_every_mode_is_a_setting() -> None:
    for mode in RoutingMode:
        assert RouterSettings(mode=mode.value).mode is mode  # type: ignore[arg-type]


def test_unknown_modes_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="unknown routing mode 'fastest'; known: kv, kv-classic"):
        make_policy("fastest")
    with pytest.raises(InvalidArgument, match="unknown routing mode 99"):
        hints_from_pb(router_pb2.RouteHints(mode=99))  # type: ignore[arg-type]
