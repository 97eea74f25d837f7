"""Which bodies an artifact event names: what a purge keeps and an export bundles."""

from __future__ import annotations

import json
from typing import Any

import pytest

from producers.artifacts import bodies_named

OWN, PNG = "a" * 64, "b" * 64


def test_its_own_body_then_each_companion_its_meta_lists_once() -> None:
    meta = {"chart": {"uri": "file:///x", "sha256": PNG, "format": "png"}, "again": {"sha256": OWN}, "rows": 2}
    assert bodies_named({"sha256": OWN, "meta": json.dumps(meta)}) == [OWN, PNG]


@pytest.mark.parametrize("meta", ["not json", "[1, 2]", json.dumps(["x"]), "[" * 100_000 + "]" * 100_000, None,
                                  json.dumps({"chart": "text"}), json.dumps({"chart": {"sha256": 7}})],
                         ids=["not json", "a list", "a list of text", "nested deeper than the parser", "none",
                              "a companion that is text", "a name that is a number"])
def test_a_meta_anyone_wrote_names_no_companion_and_raises_nothing(meta: Any) -> None:
    assert bodies_named({"sha256": OWN, "meta": meta}) == [OWN]
