"""The request guard, the request log and the route facts in-process: Starlette's TestClient over a
small app, so no BentoML server has to start for what the middlewares alone decide."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pydantic
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route
from starlette.testclient import TestClient

from serving.admission.capacity import Admission
from serving.admission.forms import BOOLEAN, NUMBER, TEXT
from serving.http.guard import GuardPolicy, RequestGuard
from serving.http.response_types import fix_response_media_types
from serving.http.route_table import route_facts
from serving.observability.request_log import RequestLog, add_log_fields
from tests.helpers import PROBLEM, fresh_tile

TOKEN = "in-process-token"  # noqa: S105 - a throwaway credential
TILE = fresh_tile("lung_n", 900)


async def _echo_upload(request: Request) -> JSONResponse:
    """Stands in for a BentoML API: what reached it, after the guard."""
    form = await request.form()
    upload = form["file"]
    add_log_fields(predicted_class="lung_n")
    return JSONResponse({"bytes": len(await upload.read()), "fields": sorted(k for k in form if k != "file")})


def guarded_app(**policy: object) -> Starlette:
    app = Starlette(routes=[
        Route("/predict", _echo_upload, methods=["POST"]),
        Route("/explain", _echo_upload, methods=["POST"]),
        Route("/model", lambda request: JSONResponse({"card": True})),
    ])
    defaults = dict(
        upload_routes={"/predict": 1, "/explain": 1},
        token_routes=frozenset({"/predict", "/explain", "/model"}),
        max_body_bytes=200_000,
        admission=Admission(8, 8, 2.0, 64 * 1024 * 1024),
        request_timeout_s=10.0,
        body_timeout_s=10.0,
        body_idle_timeout_s=5.0,
        text_fields={"/explain": {"target_class": TEXT, "include_map": BOOLEAN, "mpp": NUMBER}},
    )
    app.add_middleware(RequestGuard, policy=GuardPolicy(**{**defaults, **policy}))
    app.add_middleware(RequestLog, known_routes={"/predict", "/explain", "/model"}, upload_routes={"/predict"})
    return app


def assert_problem(response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body = response.json()
    assert body["status"] == status and body["detail"]
    return body


def test_a_valid_upload_passes_the_guard_whole():
    with TestClient(guarded_app()) as client:
        response = client.post("/explain", files={"file": ("t.jpeg", TILE)}, data={"include_map": "true"})
    assert response.status_code == 200
    assert response.json() == {"bytes": len(TILE), "fields": ["include_map"]}


@pytest.mark.parametrize(
    ("case", "files", "data", "status", "says"),
    [
        ("wrong field", {"image": ("t.jpeg", TILE)}, {}, 400, "`file`"),
        ("extra field", {"file": ("t.jpeg", TILE)}, {"note": "hi"}, 400, "note"),
        ("json in a text field", {"file": ("t.jpeg", TILE)}, {"target_class": '{"a": 1}'}, 400, "target_class"),
        ("not a boolean", {"file": ("t.jpeg", TILE)}, {"include_map": "perhaps"}, 400, "include_map"),
        ("not a number", {"file": ("t.jpeg", TILE)}, {"mpp": "half"}, 400, "mpp"),
        ("not a finite number", {"file": ("t.jpeg", TILE)}, {"mpp": "nan"}, 400, "mpp"),
        ("json in a number", {"file": ("t.jpeg", TILE)}, {"mpp": "[0.5]"}, 400, "mpp"),
        ("a repeated number", {"file": ("t.jpeg", TILE)}, {"mpp": ["0.5", "1"]}, 400, "mpp"),
        ("long text field", {"file": ("t.jpeg", TILE)}, {"target_class": "x" * 500}, 400, "128"),
        ("over the body cap", {"file": ("t.jpeg", bytes(300_000))}, {}, 413, "cap"),
    ],
)
def test_the_guard_refuses_bad_shapes_before_the_route(case, files, data, status, says):
    with TestClient(guarded_app()) as client:
        body = assert_problem(client.post("/explain", files=files, data=data), status)
    assert says in body["detail"], body


def test_non_multipart_bodies_get_415():
    with TestClient(guarded_app()) as client:
        assert_problem(client.post("/predict", content=TILE, headers={"Content-Type": "image/jpeg"}), 415)
        assert_problem(client.post("/predict", json={"file": "x"}), 415)


def test_the_token_guards_model_routes_when_set():
    with TestClient(guarded_app(api_token=TOKEN)) as client:
        refused = client.post("/predict", files={"file": ("t.jpeg", TILE)})
        assert_problem(refused, 401)
        assert refused.headers["www-authenticate"] == "Bearer"
        assert_problem(client.get("/model", headers={"Authorization": "Bearer wrong"}), 401)
        assert client.get("/model", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    with TestClient(guarded_app()) as client:  # no token configured: open
        assert client.get("/model").status_code == 200


def test_a_streamed_body_over_the_cap_is_cut_off():
    head = b'--b\r\nContent-Disposition: form-data; name="file"; filename="t"\r\n\r\n'
    body = head + bytes(300_000) + b"\r\n--b--\r\n"

    def chunks():
        for start in range(0, len(body), 65536):
            yield body[start : start + 65536]

    with TestClient(guarded_app()) as client:
        multipart = {"Content-Type": "multipart/form-data; boundary=b"}
        response = client.post("/predict", content=chunks(), headers=multipart)
    assert_problem(response, 413)
    assert response.headers["connection"] == "close"


def test_request_log_writes_one_line_with_the_id_and_never_the_file_name(caplog):
    with caplog.at_level(logging.INFO, logger="serving.observability.request_log"), TestClient(guarded_app()) as client:
        ok = client.post("/predict", files={"file": ("secret-name.jpeg", TILE)}, headers={"X-Request-ID": "abc.1"})
        unknown = client.get("/patients/1234")  # an unknown path is never logged as sent
        generated = client.post("/predict", files={"file": ("t.jpeg", TILE)}, headers={"X-Request-ID": "bad id"})
    assert ok.headers["x-request-id"] == "abc.1" and unknown.status_code == 404
    assert len(generated.headers["x-request-id"]) == 32  # an unsafe id is replaced, not echoed
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 3
    assert lines[0].startswith("POST /predict 200") and "id=abc.1" in lines[0]
    assert lines[0].endswith("predicted_class=lung_n")  # what the route noted
    assert lines[1].startswith("GET (other) 404") and "1234" not in lines[1]
    assert not [line for line in lines if "secret-name" in line]
    assert caplog.records[0].route == "/predict" and caplog.records[0].status == 200  # the JSON line's fields


def test_route_facts_come_from_the_service_routes():
    import service

    facts = route_facts(service.Histopathology.apis.values(), service.PLAIN_ROUTES.routes, 7)
    assert facts.upload_routes == {"/predict": 1, "/predict_batch": 7, "/explain": 1}
    assert facts.form_fields == {"/predict": {"mpp": NUMBER}, "/predict_batch": {"mpp": NUMBER},
                                 "/explain": {"target_class": TEXT, "include_map": BOOLEAN, "mpp": NUMBER}}
    assert facts.known_routes == {"/predict", "/predict_batch", "/explain", "/model", "/model/report", "/ui", "/ui/",
                                  "/slides"}
    assert set(facts.served_prefixes) == {"/model/report/", "/ui/", "/slides/"}
    assert facts.json_routes == frozenset()  # the slide routes read their own (small, capped) JSON


def test_route_facts_refuse_an_input_the_guard_cannot_check():
    spec = pydantic.create_model("Inputs", file=(Path, ...), threshold=(int, 5))
    api = SimpleNamespace(route="/score", input_spec=spec)
    with pytest.raises(TypeError, match="threshold"):
        route_facts([api], [Mount("/ui", routes=[])], 1)


def test_each_api_answers_with_the_media_type_bentoml_would_compute_without_building_a_schema_per_response(
    monkeypatch: pytest.MonkeyPatch,
):
    import service

    apis = service.Histopathology.apis
    fixed = {name: api.output_spec.media_type for name, api in apis.items()}
    assert fixed == {"predict": "application/json", "predict_batch": "application/json",
                     "explain": "application/json"}
    for api in apis.values():  # what BentoML works out per response when none is set
        monkeypatch.setattr(api.output_spec, "media_type", None)
        assert api.output_spec.mime_type() == fixed[api.name]
    # The per-response cost this removes: the list route's descriptor builds a JSON schema for its answer.
    built = []
    monkeypatch.setattr(apis["predict_batch"].output_spec, "model_json_schema",
                        classmethod(lambda cls, *a, **k: built.append(cls) or {"type": "array"}))
    apis["predict_batch"].output_spec.mime_type()
    assert built  # unset, every response asks for the schema
    assert fix_response_media_types([apis["predict_batch"]]) == {"predict_batch": "application/json"}
    built.clear()
    apis["predict_batch"].output_spec.mime_type()
    assert not built  # set once, it is answered as it stands


def test_streaming_apis_keep_the_media_type_bentoml_gives_them():
    stream_spec = SimpleNamespace(media_type="text/event-stream", mime_type=lambda: "text/event-stream")
    unset_stream = SimpleNamespace(media_type=None, mime_type=lambda: "application/json")
    apis = [SimpleNamespace(name="events", is_stream=True, output_spec=stream_spec),
            SimpleNamespace(name="raw", is_stream=True, output_spec=unset_stream)]
    fix_response_media_types(apis)
    assert stream_spec.media_type == "text/event-stream"
    assert unset_stream.media_type is None
