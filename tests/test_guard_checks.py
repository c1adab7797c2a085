"""The request guard's checks, exactly: each limit at its edge, each refusal's status and words, the
rewriting of other errors into problems, and the guard's own deadline. In-process (a small Starlette app
behind the guard), so `make mutation` can run them for every mutant of the guard (serving/http/guard.py and
serving/admission/)."""

from __future__ import annotations

import asyncio
import json
import time
from http import HTTPStatus

import pytest
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from serving.admission.capacity import Admission
from serving.admission.forms import (
    BOOLEAN,
    BOOLEAN_VALUES,
    MAX_FIELDS,
    MAX_FILENAME_BYTES,
    MAX_TEXT_FIELD_CHARS,
    TEXT,
    scan_parts,
)
from serving.http.deadline import REQUEST_DEADLINE
from serving.http.guard import GuardPolicy, RequestGuard, overload_response
from serving.http.problem_errors import client_safe_detail
from tests.helpers import PROBLEM

TOKEN = "guard-token"  # noqa: S105 - a throwaway credential
IMAGE = b"\xff\xd8\xff" + bytes(100)


async def _echo(request: Request) -> JSONResponse:
    """Stands in for a BentoML API: what reached it, after the guard, and the deadline it runs under."""
    body = await request.body()
    form = await request.form()
    files = [(f.filename, len(await f.read())) for f in form.getlist("file") if not isinstance(f, str)]
    return JSONResponse({"body_bytes": len(body), "files": files, "deadline": REQUEST_DEADLINE.get()})


RAN_PAST_THE_DEADLINE: list[bool] = []


async def _slow(request: Request) -> JSONResponse:
    await asyncio.sleep(0.8)
    RAN_PAST_THE_DEADLINE.append(True)  # never, when the 0.3 s deadline cancels the route in time
    await asyncio.sleep(2)
    return JSONResponse({"late": True})


async def _stalled_answer(request: Request) -> StreamingResponse:
    async def parts():
        yield b"started"
        await asyncio.sleep(2)
        yield b"never"

    return StreamingResponse(parts())


def _upload_scope(guarded: object) -> dict:
    """The ASGI scope of a multipart POST to /one, for driving the guard with hand-made messages."""
    return {"type": "http", "method": "POST", "path": "/one", "raw_path": b"/one", "query_string": b"",
            "headers": [(b"content-type", b"multipart/form-data; boundary=b")], "http_version": "1.1",
            "scheme": "http", "server": ("test", 80), "client": ("test", 1), "root_path": "", "app": guarded}


def _plain_error(status: int, text: str):
    async def route(request: Request) -> Response:
        return PlainTextResponse(text, status_code=status, headers={"X-Kept": "yes"})

    return route


def _json_error(status: int, content: object):
    async def route(request: Request) -> Response:
        return JSONResponse(content, status_code=status)

    return route


def app(**policy: object) -> Starlette:
    routes = [Route(path, _echo, methods=["POST", "GET"]) for path in ("/one", "/two", "/typed", "/json")]
    routes += [
        Route("/slow", _slow, methods=["POST"]),
        Route("/stalled", _stalled_answer, methods=["POST"]),
        Route("/teapot", _plain_error(418, "  short and stout  ")),
        Route("/empty-error", _plain_error(404, "")),
        Route("/crash", _plain_error(500, "Traceback: secret")),
        Route("/busy", _plain_error(503, "try later")),
        Route("/pydantic", _json_error(422, {"error": "bad input", "detail": [
            {"loc": ["body", "file", i], "msg": f"problem {i}"} for i in range(7)]})),
        Route("/list-error", _json_error(400, ["a", "b"])),
    ]
    starlette = Starlette(routes=routes)
    defaults = dict(
        upload_routes={"/one": 1, "/two": 2, "/typed": 1, "/slow": 1, "/stalled": 1},
        token_routes=frozenset({"/one", "/secret"}),
        max_body_bytes=100_000,
        admission=Admission(8, 8, 2.0, 64 * 1024 * 1024),
        request_timeout_s=10.0,
        body_timeout_s=10.0,
        body_idle_timeout_s=5.0,
        text_fields={"/typed": {"note": TEXT, "flag": BOOLEAN}},
        json_routes=frozenset({"/json"}),
    )
    starlette.add_middleware(RequestGuard, policy=GuardPolicy(**{**defaults, **policy}))
    return starlette


def problem_of(response, status: int) -> str:
    """The detail of a problem response with this status (and the problem shape checked)."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body = response.json()
    assert body["status"] == status and body["type"] == "about:blank"
    assert body["title"] == HTTPStatus(status).phrase
    assert int(response.headers["content-length"]) == len(response.content)
    return body["detail"]


def upload(client: TestClient, path: str = "/one", name: str = "t.jpeg", **kwargs: object):
    return client.post(path, files={"file": (name, IMAGE, "image/jpeg")}, **kwargs)


FILE_PART = 'Content-Disposition: form-data; name="file"; filename="t"'


def body_of(parts: list[tuple[str | bytes, bytes]]) -> bytes:
    """A multipart body with boundary `b` from (header lines, content) pairs, written by hand."""
    out = b""
    for head, content in parts:
        out += b"--b\r\n" + (head.encode() if isinstance(head, str) else head) + b"\r\n\r\n" + content + b"\r\n"
    return out + b"--b--\r\n"


def _multipart_body(filename: str | None = "t", name: str = "file") -> tuple[bytes, dict]:
    """One part, `filename` None for a plain field."""
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
    head = f"--b\r\nContent-Disposition: {disposition}\r\n\r\n".encode()
    return head + IMAGE + b"\r\n--b--\r\n", {"Content-Type": "multipart/form-data; boundary=b"}


# --------------------------------------------------------------------------- names, fields, parts


@pytest.mark.parametrize(("name", "accepted"), [
    ("a" * MAX_FILENAME_BYTES, True),
    ("a" * (MAX_FILENAME_BYTES + 1), False),
    ("é" * (MAX_FILENAME_BYTES // 2), True),  # bytes, not characters: two each
    ("é" * (MAX_FILENAME_BYTES // 2) + "a", False),
    ("tab\there.jpeg", False),
    ("unit\x1fsep.jpeg", False),
    ("del\x7f.jpeg", False),
    ("space ~ ok.jpeg", True),
])
def test_file_names_are_checked_at_their_limits(name, accepted):
    body, headers = _multipart_body(name)  # by hand: a client library would escape control characters
    with TestClient(app()) as client:
        response = client.post("/one", content=body, headers=headers)
    if accepted:
        assert response.status_code == 200 and response.json()["files"] == [[name, len(IMAGE)]]
    elif len(name.encode()) > MAX_FILENAME_BYTES:
        assert problem_of(response, 400) == f"the file name is longer than {MAX_FILENAME_BYTES} bytes"
    else:
        assert problem_of(response, 400) == "the file name contains control characters"


@pytest.mark.parametrize(("fields", "detail"), [
    ({"note": "x" * MAX_TEXT_FIELD_CHARS}, None),
    ({"note": "x" * (MAX_TEXT_FIELD_CHARS + 1)}, f"`note` is longer than {MAX_TEXT_FIELD_CHARS} characters"),
    ({"note": "a [list] inside"}, None),
    ({"note": "  [1, 2]"}, "`note` must be plain text, not JSON"),
    ({"note": '{"a": 1}'}, "`note` must be plain text, not JSON"),
    ({"note": '"quoted"'}, "`note` must be plain text, not JSON"),
    ({"note": ""}, None),
    ({"flag": " TRUE "}, None),
    ({"flag": "maybe"}, "`flag` must be true or false"),
    ({"flag": "x" * (MAX_TEXT_FIELD_CHARS + 1)}, f"`flag` is longer than {MAX_TEXT_FIELD_CHARS} characters"),
])
def test_text_fields_are_checked_at_their_limits(fields, detail):
    with TestClient(app()) as client:
        response = upload(client, "/typed", data=fields)
    if detail is None:
        assert response.status_code == 200, response.text
    else:
        assert problem_of(response, 400) == detail


def test_every_boolean_spelling_is_accepted():
    with TestClient(app()) as client:
        for value in sorted(BOOLEAN_VALUES):
            assert upload(client, "/typed", data={"flag": value.upper()}).status_code == 200, value


def test_multipart_shapes_get_their_own_400():
    multipart = {"Content-Type": "multipart/form-data; boundary=b"}
    with TestClient(app()) as client:
        assert problem_of(client.post("/one", data={"other": "x"}, files={"file": ("t", IMAGE)}), 400) == (
            "unexpected field(s) ['other']; this route takes `file`")
        assert problem_of(client.post("/typed", data={"zzz": "1"}, files={"file": ("t", IMAGE)}), 400) == (
            "unexpected field(s) ['zzz']; this route takes `file`, `flag`, `note`")
        string, headers = _multipart_body(filename=None)
        assert problem_of(client.post("/one", content=string, headers=headers), 400) == (
            "`file` must be an uploaded file (a part with a filename), not a string or URL")
        assert problem_of(client.post("/one", content=b"--b--\r\n", headers=multipart), 400) == (
            "no `file` part in the multipart body")
        assert problem_of(client.post("/typed", files=[("file", ("t", IMAGE)), ("note", ("n.txt", b"x"))]), 400) == (
            "`note` must be a single text field")
        assert problem_of(client.post("/typed", files={"file": ("t", IMAGE)}, data={"note": ["a", "b"]}), 400) == (
            "`note` must be a single text field")
        three = [("file", (f"{i}.jpeg", IMAGE)) for i in range(3)]
        assert problem_of(client.post("/two", files=three), 400) == "3 `file` parts; the route takes at most 2"
        assert client.post("/two", files=three[:2]).json()["files"] == [["0.jpeg", len(IMAGE)], ["1.jpeg", len(IMAGE)]]
        broken = client.post("/one", content=b"--b\r\nno headers end", headers=multipart)
        assert problem_of(broken, 400) == "malformed multipart body: Invalid multipart data."
        no_boundary = client.post("/one", content=body_of([]), headers={"Content-Type": "multipart/form-data"})
        assert problem_of(no_boundary, 400) == "malformed multipart body: Missing boundary in multipart."
        nameless = 'malformed multipart body: The Content-Disposition header field "name" must be provided.'
        unnamed = body_of([("Content-Disposition: form-data; filename=\"t\"", IMAGE)])
        assert problem_of(client.post("/one", content=unnamed, headers=multipart), 400) == nameless
        # A part without the header does not inherit the one before it.
        headerless = body_of([(FILE_PART, IMAGE), ("Content-Type: image/jpeg", IMAGE)])
        assert problem_of(client.post("/two", content=headerless, headers=multipart), 400) == nameless


def test_the_number_of_fields_is_capped_at_its_edge():
    multipart = {"Content-Type": "multipart/form-data; boundary=b"}
    with TestClient(app()) as client:
        for count, detail in [(MAX_FIELDS, "unexpected field(s) ['x']; this route takes `file`"),
                              (MAX_FIELDS + 1, f"malformed multipart body: Too many fields. Maximum number of "
                                               f"fields is {MAX_FIELDS}.")]:
            fields = [('Content-Disposition: form-data; name="x"', b"1")] * count
            body = body_of([(FILE_PART, IMAGE), *fields])
            assert problem_of(client.post("/one", content=body, headers=multipart), 400) == detail, count


def test_names_and_text_are_read_in_the_forms_charset():
    """The form's charset decides how many characters a text field has (Latin-1 when it names no known
    charset), and a file name that is not valid in it is read as Latin-1, as Starlette reads it next."""
    accented = "é" * 100  # 100 characters, 200 bytes in UTF-8: within the limit only when read as UTF-8
    longer = f"`note` is longer than {MAX_TEXT_FIELD_CHARS} characters"
    with TestClient(app()) as client:
        for charset, detail in [(None, None), ("utf-8", None), ("latin-1", longer), ("no-such-charset", longer)]:
            body = body_of([(FILE_PART, IMAGE), ('Content-Disposition: form-data; name="note"',
                                                 accented.encode("utf-8"))])
            content_type = "multipart/form-data; boundary=b" + (f"; charset={charset}" if charset else "")
            response = client.post("/typed", content=body, headers={"Content-Type": content_type})
            if detail is None:
                assert response.status_code == 200, (charset, response.text)
            else:
                assert problem_of(response, 400) == detail, charset
        not_utf8 = body_of([(b'Content-Disposition: form-data; name="file"; filename="caf\xe9.jpeg"', IMAGE)])
        response = client.post("/one", content=not_utf8, headers={"Content-Type": "multipart/form-data; boundary=b"})
        assert response.status_code == 200 and response.json()["files"] == [["café.jpeg", len(IMAGE)]]


def test_a_text_field_far_over_the_limit_is_refused_with_the_same_words():
    with TestClient(app()) as client:
        response = upload(client, "/typed", data={"note": "x" * 10_000})
    assert problem_of(response, 400) == f"`note` is longer than {MAX_TEXT_FIELD_CHARS} characters"


def test_the_header_scan_keeps_no_file_data_and_only_the_start_of_a_long_text_field():
    body = body_of([(FILE_PART, IMAGE * 50), ('Content-Disposition: form-data; name="note"', b"plain words"),
                    ('Content-Disposition: form-data; name="long"', b"y" * 10_000)])
    headers = Headers({"content-type": "multipart/form-data; boundary=b"})
    # A text value split across many chunks, of one byte and of a hundred.
    chunked = [[body[i : i + step] for i in range(0, len(body), step)] for step in (1, 100)]
    for chunks in ([body], *chunked):
        parts, charset = scan_parts(headers, chunks, max_files=1)
        assert charset == "utf-8" and [(p.name, p.filename) for p in parts] == [
            ("file", "t"), ("note", None), ("long", None)]
        file, note, long = parts
        assert file.value == b"" and not file.truncated  # file data is skipped, never copied
        assert note.value == b"plain words" and not note.truncated
        # Of a long value, no more than the limit's worst case in bytes (4 per character) and one byte past it.
        assert long.truncated and long.value == b"y" * len(long.value)
        assert len(long.value) <= 4 * MAX_TEXT_FIELD_CHARS + 1


def test_the_route_gets_the_whole_body_once_and_runs_under_the_deadline():
    with TestClient(app(request_timeout_s=7.0)) as client:
        before = time.monotonic()
        answer = upload(client)
        after = time.monotonic()
    sent = answer.request.content
    assert answer.status_code == 200 and answer.json()["body_bytes"] == len(sent)
    assert before + 7.0 <= answer.json()["deadline"] <= after + 7.0
    assert REQUEST_DEADLINE.get() is None  # set for the request only


# --------------------------------------------------------------------------- token, JSON routes, other methods


def test_the_token_is_checked_on_its_routes_and_below_them():
    with TestClient(app(api_token=TOKEN)) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                        {"Authorization": TOKEN}):
            refused = upload(client, headers=headers)
            assert problem_of(refused, 401) == "missing or wrong API token; send `Authorization: Bearer <token>`"
            assert refused.headers["www-authenticate"] == "Bearer"
        assert upload(client, headers={"Authorization": f"bearer  {TOKEN} "}).status_code == 200
        assert problem_of(client.get("/secret/below"), 401)  # everything under a token route
        assert client.get("/two").status_code == 200  # not a token route
        assert problem_of(client.get("/secretly"), 404)  # a prefix of the name is not below the route


def test_json_routes_take_json_only():
    with TestClient(app()) as client:
        detail = problem_of(client.post("/json", content=b"a=1", headers={"Content-Type": "text/plain"}), 415)
        assert detail == "send a JSON body (application/json)"
        assert problem_of(client.post("/json", files={"file": ("t", IMAGE)}), 415) == detail
        assert client.post("/json", content=b"{}", headers={"Content-Type": "Application/JSON; charset=utf-8"}
                           ).status_code == 200
        assert client.get("/json").status_code == 200  # only POST bodies are checked
        assert problem_of(client.post("/json", content=b"{}", headers={"Content-Type": ""}), 415) == detail
        assert problem_of(client.post("/json"), 415) == detail  # no content type at all


def test_uploads_must_be_multipart_and_other_methods_pass():
    with TestClient(app()) as client:
        detail = problem_of(client.post("/one", content=IMAGE, headers={"Content-Type": "image/jpeg"}), 415)
        assert detail == "send multipart/form-data with the image in a `file` field, not image/jpeg"
        empty = client.post("/one", content=IMAGE, headers={"Content-Type": ""})
        assert problem_of(empty, 415).endswith("not no type")
        assert empty.headers["connection"] == "close"
        absent = client.post("/one", content=IMAGE)
        assert "content-type" not in absent.request.headers
        assert problem_of(absent, 415) == "send multipart/form-data with the image in a `file` field, not no type"
        assert client.get("/one", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200  # no upload


# --------------------------------------------------------------------------- the body's size and time


def test_the_declared_length_is_checked_before_reading():
    with TestClient(app(max_body_bytes=1000)) as client:
        for declared in ("1001", "-1", "12ab"):
            refused = client.post("/one", content=b"x", headers={
                "Content-Type": "multipart/form-data; boundary=b", "Content-Length": declared})
            assert problem_of(refused, 413) == "request body over the 1000-byte cap"
            assert refused.headers["connection"] == "close"


def test_a_body_exactly_at_the_cap_passes():
    boundary = b"b"
    head = b'--b\r\nContent-Disposition: form-data; name="file"; filename="t"\r\n\r\n'
    body = head + IMAGE + b"\r\n--" + boundary + b"--\r\n"
    headers = {"Content-Type": "multipart/form-data; boundary=b"}
    with TestClient(app(max_body_bytes=len(body))) as client:
        assert client.post("/one", content=body, headers=headers).status_code == 200
    with TestClient(app(max_body_bytes=len(body) - 1)) as client:
        problem_of(client.post("/one", content=iter([body[:10], body[10:]]), headers=headers), 413)


def _trickled(guarded: Starlette, body: bytes, gap_s: float, pieces: int) -> tuple[int, dict, str]:
    """POST /one straight through ASGI, the body in `pieces` with `gap_s` between them (a test client
    would read the whole body first); returns (status, headers, detail)."""
    step = -(-len(body) // pieces)
    chunks = [body[start : start + step] for start in range(0, len(body), step)]
    messages = [{"type": "http.request", "body": chunk, "more_body": index < len(chunks) - 1}
                for index, chunk in enumerate(chunks)]
    return _through_asgi(guarded, messages, gap_s)


def _through_asgi(guarded: Starlette, messages: list[dict], gap_s: float = 0.0) -> tuple[int, dict, str]:
    """POST /one with these body messages, as a server would hand them over; (status, headers, detail
    or, for a 200, the route's JSON)."""
    messages = list(messages)
    sent: list[dict] = []

    async def receive() -> dict:
        await asyncio.sleep(gap_s)
        return messages.pop(0)

    async def send(message: dict) -> None:
        sent.append(message)

    scope = _upload_scope(guarded)
    asyncio.run(guarded(scope, receive, send))
    start = sent[0]
    payload = json.loads(b"".join(m.get("body", b"") for m in sent[1:]))
    headers = {k.decode().lower(): v.decode() for k, v in start["headers"]}
    return start["status"], headers, payload["detail"] if start["status"] >= 400 else payload


def test_a_stalled_body_gets_408_for_its_pause():
    body, _ = _multipart_body()
    status, headers, detail = _trickled(app(body_idle_timeout_s=0.2, body_timeout_s=30.0), body, 0.6, 2)
    assert (status, detail) == (408, "the request body stalled for 0.2 s")
    assert headers["connection"] == "close" and headers["content-type"] == PROBLEM


def test_a_slow_body_gets_408_for_its_total():
    body, _ = _multipart_body()
    status, _, detail = _trickled(app(body_idle_timeout_s=5.0, body_timeout_s=0.5), body, 0.2, 8)
    assert (status, detail) == (408, "the request body did not arrive within 0.5 s")


def test_a_body_that_keeps_coming_within_both_limits_passes():
    body, _ = _multipart_body()
    assert _trickled(app(body_idle_timeout_s=2.0, body_timeout_s=20.0), body, 0.01, 4)[0] == 200


def _pieces(body: bytes, *sizes: int) -> list[dict]:
    """Body messages of these sizes (the rest in a last one, which names no `more_body`: the default)."""
    messages, start = [], 0
    for size in sizes:
        messages.append({"type": "http.request", "body": body[start : start + size], "more_body": True})
        start += size
    messages.append({"type": "http.request", "body": body[start:]})
    return messages


def test_the_body_cap_counts_every_chunk():
    body, _ = _multipart_body()
    status, headers, detail = _through_asgi(app(max_body_bytes=len(body) - 1), _pieces(body, 60, 60))
    assert (status, detail) == (413, f"request body over the {len(body) - 1}-byte cap")
    assert headers["connection"] == "close"
    status, _, answer = _through_asgi(app(max_body_bytes=len(body)), _pieces(body, 60, 60))
    assert status == 200 and answer["body_bytes"] == len(body)


def test_messages_without_a_body_add_nothing():
    body, _ = _multipart_body()
    messages = [{"type": "http.request", "more_body": True}, *_pieces(body, 50)]
    status, _, answer = _through_asgi(app(), messages)
    assert status == 200 and answer["body_bytes"] == len(body) and answer["files"] == [["t", len(IMAGE)]]


def test_bytes_still_arriving_over_the_workers_budget_get_503():
    body, _ = _multipart_body()  # 178 bytes
    admission = Admission(8, 8, 2.0, max_buffered_bytes=100)
    status, headers, detail = _through_asgi(app(admission=admission), _pieces(body, 40, 40, 40))
    assert (status, detail) == (503, "over capacity (0 MiB of uploads arriving); retry after 1 s")
    assert headers["retry-after"] == "1" and headers["connection"] == "close"
    assert admission.buffered_bytes == 0 and admission.open_uploads == 0  # everything given back
    # The last chunk may cross the budget: the body is complete, nothing more is held for it.
    status, _, answer = _through_asgi(app(admission=admission), _pieces(body, 90))
    assert status == 200 and answer["body_bytes"] == len(body)
    status, _, _ = _through_asgi(app(admission=Admission(8, 8, 2.0, max_buffered_bytes=100)), _pieces(body, 100))
    assert status == 200  # exactly at the budget while arriving: still taken


def test_the_parsers_own_limits_are_one_over_the_routes():
    with TestClient(app()) as client:
        three = [("file", (f"{i}.jpeg", IMAGE)) for i in range(3)]
        assert problem_of(client.post("/one", files=three), 400) == (
            "malformed multipart body: Too many files. Maximum number of files is 2.")
        fields = {f"f{i}": "x" for i in range(17)}
        assert problem_of(client.post("/one", data=fields, files={"file": ("t", IMAGE)}), 400) == (
            "malformed multipart body: Too many fields. Maximum number of fields is 16.")
        names = {f"{'n' * 45}{i}": "x" for i in range(7)}
        detail = problem_of(client.post("/one", data=names, files={"file": ("t", IMAGE)}), 400)
        assert detail == f"unexpected field(s) {['n' * 40] * 5}; this route takes `file`"


def test_a_client_that_leaves_mid_body_gets_400():
    guarded = app()
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = _upload_scope(guarded)
    asyncio.run(guarded(scope, receive, send))
    assert sent[0]["status"] == 400
    assert json.loads(sent[1]["body"])["detail"] == "the client went away before the request body was complete"


# --------------------------------------------------------------------------- admission


def test_a_full_worker_refuses_with_an_exact_503():
    admission = Admission(max_in_flight=1, max_open_uploads=8, max_queue_delay_s=2.0)
    admission.in_flight = 1
    with TestClient(app(admission=admission)) as client:
        refused = upload(client)
        assert problem_of(refused, 503) == "over capacity (1 requests in flight); retry after 1 s"
        assert refused.headers["retry-after"] == "1" and refused.headers["connection"] == "close"
        assert "x-request-id" not in refused.headers
        admission.in_flight = 0
        assert upload(client).status_code == 200
    assert admission.in_flight == 0 and admission.open_uploads == 0 and admission.buffered_bytes == 0


def test_the_overload_response_names_its_request():
    async def capture() -> list[dict]:
        sent: list[dict] = []

        async def send(message: dict) -> None:
            sent.append(message)

        await overload_response("over capacity (test)", "req-1")({"type": "http"}, None, send)
        return sent

    start, body = asyncio.run(capture())
    assert start["status"] == 503
    # ASGI header names are lower-case bytes: exactly these, in this order.
    length = str(len(body["body"])).encode()
    assert start["headers"] == [(b"content-type", PROBLEM.encode()), (b"content-length", length),
                                (b"retry-after", b"1"), (b"connection", b"close"), (b"x-request-id", b"req-1")]
    assert json.loads(body["body"]) == {"type": "about:blank", "title": "Service Unavailable", "status": 503,
                                        "detail": "over capacity (test); retry after 1 s"}


def test_admission_counts_the_upload_while_it_arrives_and_in_flight_while_served():
    admission = Admission(8, 8, 2.0)
    seen: dict[str, int] = {}

    async def observe(request: Request) -> JSONResponse:
        seen.update(in_flight=admission.in_flight, open_uploads=admission.open_uploads,
                    buffered=admission.buffered_bytes)
        return JSONResponse({})

    starlette = Starlette(routes=[Route("/one", observe, methods=["POST"])])
    starlette.add_middleware(RequestGuard, policy=GuardPolicy(
        upload_routes={"/one": 1}, token_routes=frozenset(), max_body_bytes=100_000, admission=admission,
        request_timeout_s=10, body_timeout_s=10, body_idle_timeout_s=5))
    with TestClient(starlette) as client:
        assert upload(client).status_code == 200
    assert seen == {"in_flight": 1, "open_uploads": 0, "buffered": 0}
    assert admission.in_flight == 0


def test_admission_counts_every_upload_arriving_and_every_request_in_flight_at_once():
    admission = Admission(8, 8, 2.0)
    bodies_may_end, routes_may_answer = asyncio.Event(), asyncio.Event()

    async def hold(request: Request) -> JSONResponse:
        await routes_may_answer.wait()
        return JSONResponse({})

    starlette = Starlette(routes=[Route("/one", hold, methods=["POST"])])
    starlette.add_middleware(RequestGuard, policy=GuardPolicy(
        upload_routes={"/one": 1}, token_routes=frozenset(), max_body_bytes=100_000, admission=admission,
        request_timeout_s=10, body_timeout_s=10, body_idle_timeout_s=5))
    body, _ = _multipart_body()

    async def one_request() -> int:
        chunks = [{"type": "http.request", "body": body[:20], "more_body": True},
                  {"type": "http.request", "body": body[20:], "more_body": False}]

        async def receive() -> dict:
            if len(chunks) == 1:
                await bodies_may_end.wait()
            return chunks.pop(0) if chunks else {"type": "http.disconnect"}

        sent: list[dict] = []

        async def send(message: dict) -> None:
            sent.append(message)

        await starlette(_upload_scope(starlette), receive, send)
        return next(m["status"] for m in sent if m["type"] == "http.response.start")

    async def until(condition) -> None:
        while not condition():
            await asyncio.sleep(0.001)

    async def scenario() -> list[int]:
        requests = [asyncio.create_task(one_request()) for _ in range(2)]
        await until(lambda: admission.open_uploads == 2)  # both bodies arriving at once
        assert admission.in_flight == 0
        bodies_may_end.set()
        await until(lambda: admission.in_flight == 2)  # both served at once
        assert admission.open_uploads == 0
        routes_may_answer.set()
        return await asyncio.gather(*requests)

    assert asyncio.run(asyncio.wait_for(scenario(), 10)) == [200, 200]
    assert (admission.open_uploads, admission.in_flight, admission.buffered_bytes) == (0, 0, 0)


# --------------------------------------------------------------------------- the guard's deadline


def test_a_request_not_answered_in_time_gets_the_guards_504():
    RAN_PAST_THE_DEADLINE.clear()
    with TestClient(app(request_timeout_s=0.3)) as client:
        assert problem_of(upload(client, "/slow"), 504) == "the request was not answered within 0.3 s; retry later"
    assert not RAN_PAST_THE_DEADLINE  # cancelled at its deadline, not some time later


def test_an_answer_already_started_is_not_rewritten_at_the_deadline():
    with TestClient(app(request_timeout_s=0.3)) as client, pytest.raises(TimeoutError):
        upload(client, "/stalled")


# --------------------------------------------------------------------------- other errors become problems


def test_other_error_responses_become_problems_with_safe_details():
    with TestClient(app()) as client:
        teapot = client.get("/teapot")
        assert problem_of(teapot, 418) == "short and stout" and teapot.headers["x-kept"] == "yes"
        assert problem_of(client.get("/empty-error"), 404) == HTTPStatus.NOT_FOUND.description
        assert problem_of(client.get("/crash"), 500) == "an unexpected error occurred; it has been logged"
        assert problem_of(client.get("/busy"), 503) == "try later"
        assert problem_of(client.get("/pydantic"), 422) == "bad input: " + "; ".join(
            f"body.file.{i}: problem {i}" for i in range(5))
        assert problem_of(client.get("/list-error"), 400) == "['a', 'b']"
        assert problem_of(client.get("/nowhere"), 404) == "Not Found"


@pytest.mark.parametrize(("status", "original", "detail"), [
    (HTTPStatus.BAD_GATEWAY, b"upstream said no", "an unexpected error occurred; it has been logged"),
    (HTTPStatus.SERVICE_UNAVAILABLE, b"warming up", "warming up"),
    (HTTPStatus.BAD_REQUEST, b"x" * 600, "x" * 500),
    (HTTPStatus.BAD_REQUEST, b"\xff oops ", "\ufffd oops"),
    (HTTPStatus.BAD_REQUEST, b"   ", HTTPStatus.BAD_REQUEST.description),
    (HTTPStatus.BAD_REQUEST, b'{"detail": "said so"}', "said so"),
    (HTTPStatus.BAD_REQUEST, b'{"error": "e", "detail": "d"}', "e"),
    (HTTPStatus.BAD_REQUEST, b"{}", HTTPStatus.BAD_REQUEST.description),
    (HTTPStatus.BAD_REQUEST, b'{"detail": []}', HTTPStatus.BAD_REQUEST.description),
    (HTTPStatus.BAD_REQUEST, b'{"error": "e", "detail": [{"loc": ["a", 1]}, {"msg": "m"}]}', "e: a.1: ; : m"),
    (HTTPStatus.BAD_REQUEST, json.dumps({"error": "y" * 600}).encode(), "y" * 500),
    (HTTPStatus.BAD_REQUEST, json.dumps(["z" * 600]).encode(), str(["z" * 600])[:500]),
    (HTTPStatus.BAD_REQUEST, b"42", "42"),
])
def test_error_details_are_rewritten_safely(status, original, detail):
    assert client_safe_detail(status, original) == detail


def test_a_chunk_that_arrives_after_the_body_deadline_ends_the_upload():
    # The chunk comes back late but whole (this receive blocks the loop, so no timer can fire first):
    # the next read finds the deadline gone and refuses without waiting.
    body, _ = _multipart_body()
    guarded = app(body_idle_timeout_s=5.0, body_timeout_s=0.3)
    messages = _pieces(body, 60, 60)
    sent: list[dict] = []

    async def receive() -> dict:
        time.sleep(0.5)  # blocking on purpose: past the whole body's deadline
        return messages.pop(0)

    async def send(message: dict) -> None:
        sent.append(message)

    scope = _upload_scope(guarded)
    asyncio.run(guarded(scope, receive, send))
    assert sent[0]["status"] == 408 and len(messages) == 2  # refused after the first chunk
    assert json.loads(sent[1]["body"])["detail"] == "the request body did not arrive within 0.3 s"


def test_a_streamed_error_body_is_rewritten_whole():
    async def streamed_error(request: Request) -> StreamingResponse:
        async def parts():
            yield b"first half, "
            yield b"second half"

        return StreamingResponse(parts(), status_code=409, media_type="text/plain")

    starlette = Starlette(routes=[Route("/conflict", streamed_error)])
    starlette.add_middleware(RequestGuard, policy=GuardPolicy(
        upload_routes={}, token_routes=frozenset(), max_body_bytes=1000, admission=Admission(8, 8, 2.0),
        request_timeout_s=10, body_timeout_s=10, body_idle_timeout_s=5))
    with TestClient(starlette) as client:
        assert problem_of(client.get("/conflict"), 409) == "first half, second half"


def test_a_worker_that_filled_up_while_the_body_arrived_refuses_after_it():
    admission = Admission(max_in_flight=1, max_open_uploads=8, max_queue_delay_s=2.0)
    body, _ = _multipart_body()
    messages = _pieces(body, 60)

    async def fill_up_then_deliver() -> dict:
        admission.in_flight = 1  # another request was admitted meanwhile
        return messages.pop(0)

    guarded = app(admission=admission)
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    scope = _upload_scope(guarded)
    asyncio.run(guarded(scope, fill_up_then_deliver, send))
    assert sent[0]["status"] == 503 and (b"connection", b"close") in sent[0]["headers"]
    assert json.loads(sent[1]["body"])["detail"] == "over capacity (1 requests in flight); retry after 1 s"
    assert admission.open_uploads == 0 and admission.in_flight == 1  # its own count never taken
