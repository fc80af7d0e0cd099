"""The HTTP API's models and the edge middleware, without Ray: the contract's fields, the schema's bounds, the error
wording, and the key and body limits enforced before a route reads anything."""

from __future__ import annotations

import dataclasses

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from deployments.edge import Edge, EdgeSettings
from deployments.schemas import (
    DetectorInfo,
    GeneratedImage,
    GenerateRequest,
    InfoResponse,
    ModelsUsed,
    Moderation,
    ModerationResult,
    schema_with_limits,
)
from deployments.validation import describe_validation
from pipeline import Verdict
from pipeline.moderate import weight_parts
from pipeline.requests import GenerationLimits, GenerationRequest


def test_moderation_models_carry_every_verdict_field():
    verdict = {f.name for f in dataclasses.fields(Verdict)}
    assert set(Moderation.model_fields) == verdict | {"batch_size"}
    assert set(ModerationResult.model_fields) == verdict | {"batch_size", "filename"}
    assert set(GeneratedImage.model_fields) == {
        "index",
        "nsfw",
        "action",
        "flagged_categories",
        "image_png_base64",
        "image_base64",
        "media_type",
        "moderation",
    }


def test_info_and_models_say_which_parts_are_demo_and_which_real():
    from pipeline.detectors.open_nsfw import OpenNSFW

    assert set(DetectorInfo.model_fields) == set(OpenNSFW().info())  # every field a detector reports, typed
    assert {"demo", "real", "detectors", "demo_weights"} <= set(InfoResponse.model_fields)
    assert {"demo", "real", "demo_weights"} <= set(ModelsUsed.model_fields)
    offline = {"demo_weights": True, "demo": ["stock checker", "text concepts"], "real": ["open_nsfw"]}
    assert weight_parts({"demo_weights": True}, offline) == {
        "demo": ["stock checker", "text concepts", "generator"],
        "real": ["open_nsfw"],
    }
    assert offline["demo"] == ["stock checker", "text concepts"]  # the checker's own lists are not changed
    # a moderation-only service; a stand-in checker that lists no parts is placed by its demo_weights
    assert weight_parts(None, {"demo_weights": False}) == {"demo": [], "real": ["stock checker"]}
    assert weight_parts({"demo_weights": False}, {"demo_weights": True}) == {
        "demo": ["stock checker"],
        "real": ["generator"],
    }


def test_generate_request_is_the_core_request_with_its_limits_as_bounds():
    # the core's request, and how the released images are encoded (an ingress matter: never sent to the generator)
    assert set(GenerateRequest.model_fields) == set(GenerationRequest.model_fields) | {"image_format"}
    schema = GenerateRequest.model_json_schema()
    props = schema["properties"]
    assert schema["additionalProperties"] is False and schema["required"] == ["prompt"]
    assert (props["num_images"]["minimum"], props["num_images"]["maximum"]) == (1, 4)
    assert (props["guidance_scale"]["minimum"], props["guidance_scale"]["maximum"]) == (0.0, 30.0)
    seed = next(b for b in props["seed"]["anyOf"] if b["type"] == "integer")
    assert (seed["minimum"], seed["maximum"]) == (0, 2**32 - 1)
    document = {"components": {"schemas": {"GenerateRequest": schema}}, "paths": {}}
    schema_with_limits(document, GenerationLimits(max_images=8, max_size=512), max_files=10)
    assert props["num_images"]["maximum"] == 8
    assert next(b for b in props["height"]["anyOf"] if b["type"] == "integer")["maximum"] == 512


@pytest.mark.parametrize(
    ("errors", "expected"),
    [
        (
            [{"type": "int_type", "loc": ("body", "steps"), "msg": "Input should be a valid integer", "input": "x"}],
            "`steps`: input should be a valid integer, got 'x'; allowed: an integer within 1..150",
        ),
        ([{"type": "missing", "loc": ("body", "prompt"), "msg": "Field required"}], "`prompt` is required"),
        ([{"type": "json_invalid", "loc": ("body", 3), "ctx": {"error": "Expecting value"}}], "not valid JSON"),
        ([{"type": "dict_type", "loc": ("body",), "input": [1]}], "must be a JSON object with at least `prompt`"),
    ],
)
def test_validation_errors_name_the_field_the_value_and_the_range(errors, expected):
    assert expected in describe_validation(errors)


def test_validation_errors_use_the_deployment_limits_and_cap_the_list():
    error = {"type": "int_type", "loc": ("body", "num_images"), "msg": "Input should be a valid integer", "input": 1.5}
    assert "within 1..8" in describe_validation([error], GenerationLimits(max_images=8))
    assert describe_validation([error] * 12).endswith("; and 2 more")


def _edge_app(key: str | None = "k", max_body: int = 1000, max_files: int = 2) -> TestClient:
    app = FastAPI()
    app.state.edge = EdgeSettings(key, max_body, max_files)
    app.add_middleware(Edge, request_id=lambda request: "rid")
    read = []

    @app.post("/v1/moderate")
    async def moderate(request: Request) -> dict:
        read.append(len(await request.body()))
        return {"read": read[-1]}

    @app.get("/healthz")
    async def health() -> dict:
        return {"ready": True}

    client = TestClient(app)
    client.read = read
    return client


def test_edge_refuses_a_wrong_key_before_reading_the_body():
    client = _edge_app()
    r = client.post("/v1/moderate", content=b"x" * 10, headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401 and r.json() == {
        "error": "missing or wrong API key: send `Authorization: Bearer <key>`",
        "request_id": "rid",
    }
    assert client.read == [] and client.get("/healthz").status_code == 200  # /healthz stays open
    assert client.post("/v1/moderate", content=b"abc", headers={"Authorization": "Bearer k"}).json() == {"read": 3}


def test_edge_refuses_bodies_over_the_limit_and_too_many_file_parts():
    client = _edge_app(key=None)
    r = client.post("/v1/moderate", content=b"x" * 1001)
    assert r.status_code == 413 and "1001 bytes; the limit is 1000" in r.json()["error"]
    chunks = iter([b"x" * 600, b"x" * 600])
    r = client.post("/v1/moderate", content=chunks)  # streamed, no Content-Length
    assert r.status_code == 413 and "over the limit of 1000 bytes" in r.json()["error"]
    files = [("files", (f"{i}.png", b"1", "image/png")) for i in range(3)]
    r = client.post("/v1/moderate", files=files)
    assert r.status_code == 413 and "carries 3 files; the limit is 2" in r.json()["error"]
    assert client.read == []
    assert client.post("/v1/moderate", files=files[:2]).status_code == 200


def test_a_text_part_named_files_is_not_a_file():
    error = {
        "type": "value_error",
        "loc": ("body", "files", 0),
        "msg": "Value error, expected UploadFile",
        "input": "x",
    }
    assert describe_validation([error]).startswith("multipart body has no `files` field with a file at `files.0`")
