"""Pulumi's resource mocks for the infrastructure tests: they stand in for the cloud provider
(Pulumi's documented way to unit-test programs); the code under test is real."""

from __future__ import annotations

import json
from typing import Any

import pulumi

PROJECT = "langchain-bq-audit-infra"  # Pulumi.yaml's name: the program's config namespace


class Recorder(pulumi.runtime.Mocks):
    """Records every resource; fills in `project` as the provider would."""

    def __init__(self) -> None:
        self.resources: list[tuple[str, str, dict[str, Any]]] = []

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict[str, Any]]:
        self.resources.append((args.typ, args.name, dict(args.inputs)))
        state = dict(args.inputs)
        if args.typ.startswith("gcp:") and "project" not in state:
            state["project"] = "provider-project"
        return (args.name + "_id", state)

    def call(self, args: pulumi.runtime.MockCallArgs) -> dict[str, Any]:
        return {}

    def of_type(self, typ: str) -> list[dict[str, Any]]:
        return [inputs for t, _, inputs in self.resources if t == typ]


def declare(build: Any) -> dict[str, Any]:
    """Run `build()` as a Pulumi program; return its resolved outputs once all resources
    are registered."""
    resolved: dict[str, Any] = {}

    @pulumi.runtime.test
    def program() -> Any:
        infra = build()
        return pulumi.Output.all(infra.dataset_id, infra.table_id, infra.full_table_id).apply(
            lambda v: resolved.update(dataset_id=v[0], table_id=v[1], full_table_id=v[2])
        )

    program()
    return resolved


def pulumi_table_definition(inputs: dict[str, Any]) -> dict[str, Any]:
    """A Table resource's inputs in `schema.table_definition`'s shape."""
    part = inputs["timePartitioning"]
    expiration = part.get("expirationMs")
    return {
        "schema": json.loads(inputs["schema"]),
        "time_partitioning": {
            "type": part["type"],
            "field": part["field"],
            "expiration_ms": None if expiration is None else int(expiration),
        },
        "clustering": inputs.get("clusterings", []),  # the digests table has none
        "description": inputs["description"],
        "labels": inputs["labels"],
    }
