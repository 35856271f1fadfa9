"""The annotation web app: a Starlette app served by uvicorn (``annotate serve``).

The page shell (``/`` and ``/static/``) holds no data and needs no token. Every ``/api/``
request needs an annotator's token in the ``X-Annotator-Token`` header (401 otherwise).
State changes are POSTs with a UTF-8 JSON body (400 otherwise) of at most :data:`MAX_BODY` bytes
(413, by ``Content-Length`` before reading, and while reading chunked bodies), text fields at
most :data:`MAX_TEXT` characters (422). Every response forbids framing and MIME sniffing and
carries :data:`CONTENT_SECURITY_POLICY`. Images are addressed by the task's number in the
annotator's list and a view name that the task lists resolve (unknown ones: 404); no request
path reaches the filesystem. A vote is committed to SQLite (WAL) before its POST is answered,
and ``next`` always serves the first task in order without a vote, so a restarted server
resumes where each annotator stopped.

API (JSON):

- ``GET /api/me``: ``{annotator, round, compare: bool}``;
- ``GET /api/instances/next``: ``{done, progress: {done, total}, task}``, task =
  ``{n, image_id, instance_id, slots: [letters]}``;
- ``POST /api/instances/{n}``: ``{best: i, worst: j, flagged: [k...], description}`` (slot
  indexes) or ``{skip: true}``; ``GET /api/images/instance/{n}/{lq|hq|0..N-1}``: PNG;
- ``GET /api/compare/next``: ``{done, progress, task: {n}}`` (model names stay hidden);
- ``POST /api/compare/{n}``: ``{answer: left|right|tie|both_bad}``;
  ``GET /api/images/compare/{n}/{left|right|lq}``: PNG.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipeline.annotate import render
from pipeline.annotate.store import Store, now
from pipeline.annotate.tasks import CompareTask, InstanceTask, RoundSettings, compare_tasks

STATIC = Path(__file__).parent / "static"
TOKEN_HEADER = "x-annotator-token"
MAX_BODY = 8192
MAX_TEXT = 500
ANSWERS = ("left", "right", "tie", "both_bad")
#: the page's policy: its own script, style and images (and the blob: URLs app.js makes of the
#: images it fetches), nothing inline, never in a frame (docs/design.md §11)
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' blob:",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
SECURITY_HEADERS = [
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
]


@dataclass
class AppState:
    """What the app serves: the store, the instance tasks and the compare round (or None)."""

    store: Store
    results: Path
    framework: str
    instances: list[InstanceTask]
    round: RoundSettings | None
    compare_cache: dict[str, list[CompareTask]]
    shown: dict[tuple[str, str], str]  # (annotator, task id) -> when first served
    lock: threading.Lock


def annotator_of(request: Request) -> str:
    name = request.app.state.data.store.annotator_for(request.headers.get(TOKEN_HEADER))
    if name is None:
        raise HTTPException(401, "unknown or missing annotator token (X-Annotator-Token header)")
    return name


def check_length(request: Request) -> None:
    """413 when the ``Content-Length`` is over :data:`MAX_BODY`, before any byte is read."""
    value = request.headers.get("content-length", "0")
    if not value.isdigit():
        raise HTTPException(400, f"bad Content-Length {value!r}")
    if int(value) > MAX_BODY:
        raise HTTPException(413, f"request body over {MAX_BODY} bytes ({value} announced)")


async def read_body(request: Request) -> bytes:
    """The body, read chunk by chunk and refused (413) as soon as it passes :data:`MAX_BODY`,
    announced or not (docs/design.md §11): at most one chunk past the limit is ever held."""
    check_length(request)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise HTTPException(413, f"request body over {MAX_BODY} bytes")
    return bytes(body)


async def json_body(request: Request) -> dict[str, Any]:
    body = await read_body(request)
    try:
        value = json.loads(body.decode("utf-8") or "{}")
    except UnicodeDecodeError as error:
        raise HTTPException(
            400, f"body is not UTF-8 (byte {error.start}: {error.reason}); send UTF-8 JSON"
        ) from error
    except json.JSONDecodeError as error:
        raise HTTPException(400, f"body is not JSON: {error}") from error
    if not isinstance(value, dict):
        raise HTTPException(400, "body must be a JSON object")
    return value


def progress(done: int, total: int) -> dict[str, int]:
    return {"done": done, "total": total}


# ---------------------------------------------------------------- instances


def next_instance(state: AppState, annotator: str) -> dict[str, Any]:
    answered = state.store.answered_instances(annotator)
    total = len(state.instances)
    for n, task in enumerate(state.instances):
        if task.task_id not in answered:
            state.shown.setdefault((annotator, task.task_id), now())
            letters = [chr(ord("A") + i) for i in range(len(task.candidates))]
            return {
                "done": False,
                "progress": progress(len(answered), total),
                "task": {
                    "n": n,
                    "image_id": task.image_id,
                    "instance_id": task.instance_id,
                    "slots": letters,
                },
            }
    return {"done": True, "progress": progress(len(answered), total), "task": None}


def instance_task(state: AppState, n: int) -> InstanceTask:
    if not 0 <= n < len(state.instances):
        raise HTTPException(404, f"no instance task {n}")
    return state.instances[n]


def parse_instance_vote(task: InstanceTask, body: dict[str, Any]) -> dict[str, Any]:
    """The stored form of an instance answer (settings, not slots); 422 on a bad answer."""
    if body.get("skip") is True:
        return {"skipped": True, "flagged": [], "description": ""}
    count = len(task.candidates)

    def slot(value: Any, what: str) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < count:
            raise HTTPException(422, f"{what} must be a slot index 0..{count - 1}, got {value!r}")
        return value

    best, worst = slot(body.get("best"), "best"), slot(body.get("worst"), "worst")
    if best == worst:
        raise HTTPException(422, "best and worst must be different candidates")
    flagged = body.get("flagged", [])
    if not isinstance(flagged, list) or len(flagged) > count:
        raise HTTPException(422, "flagged must be a list of slot indexes")
    flagged = sorted({slot(value, "flagged") for value in flagged})
    description = body.get("description", "")
    if not isinstance(description, str) or len(description) > MAX_TEXT:
        raise HTTPException(422, f"description must be text of at most {MAX_TEXT} characters")
    return {
        "best": task.candidates[best],
        "worst": task.candidates[worst],
        "flagged": [task.candidates[i] for i in flagged],
        "description": " ".join(description.split()),
        "skipped": False,
    }


async def api_instances_next(request: Request) -> JSONResponse:
    annotator = annotator_of(request)
    return JSONResponse(next_instance(request.app.state.data, annotator))


async def api_instances_vote(request: Request) -> JSONResponse:
    annotator = annotator_of(request)
    state: AppState = request.app.state.data
    task = instance_task(state, request.path_params["n"])
    vote = parse_instance_vote(task, await json_body(request))
    vote["shown_at"] = state.shown.get((annotator, task.task_id))
    record = {"task_id": task.task_id, "image_id": task.image_id, "instance_id": task.instance_id}
    stored = state.store.add_instance_vote(annotator, record, vote)  # committed here
    answered = len(state.store.answered_instances(annotator))
    return JSONResponse(
        {"ok": True, "stored": stored, "progress": progress(answered, len(state.instances))}
    )


async def api_instance_image(request: Request) -> Response:
    annotator_of(request)
    state: AppState = request.app.state.data
    task = instance_task(state, request.path_params["n"])
    view = request.path_params["view"]
    paths = {"lq": task.lq_path, "hq": task.hq_path}
    paths.update({str(i): path for i, path in enumerate(task.candidate_paths)})
    if view not in paths:
        raise HTTPException(404, f"no view {view!r} of instance task {task.task_id}")
    data = render.instance_view(paths[view], task.masks, task.image_id, task.instance_id, task.bbox)
    return Response(data, media_type="image/png", headers={"Cache-Control": "no-store"})


# ---------------------------------------------------------------- compare


def annotator_round(state: AppState, annotator: str) -> list[CompareTask]:
    if state.round is None:
        raise HTTPException(404, "this server runs no compare round (start it with --testset)")
    with state.lock:
        if annotator not in state.compare_cache:
            state.compare_cache[annotator] = compare_tasks(
                state.round, state.results, state.framework, annotator
            )
        return state.compare_cache[annotator]


async def api_compare_next(request: Request) -> JSONResponse:
    annotator = annotator_of(request)
    state: AppState = request.app.state.data
    tasks = annotator_round(state, annotator)
    answered = state.store.answered_compare(annotator, state.round.round)
    for n, task in enumerate(tasks):
        if task.task_id not in answered:
            state.shown.setdefault((annotator, task.task_id), now())
            return JSONResponse(
                {"done": False, "progress": progress(len(answered), len(tasks)), "task": {"n": n}}
            )
    return JSONResponse(
        {"done": True, "progress": progress(len(answered), len(tasks)), "task": None}
    )


def compare_task(state: AppState, annotator: str, n: int) -> CompareTask:
    tasks = annotator_round(state, annotator)
    if not 0 <= n < len(tasks):
        raise HTTPException(404, f"no compare task {n}")
    return tasks[n]


async def api_compare_vote(request: Request) -> JSONResponse:
    annotator = annotator_of(request)
    state: AppState = request.app.state.data
    task = compare_task(state, annotator, request.path_params["n"])
    answer = (await json_body(request)).get("answer")
    if answer not in ANSWERS:
        raise HTTPException(422, f"answer must be one of {ANSWERS}, got {answer!r}")
    record = {
        "task_id": task.task_id,
        "testset": task.testset,
        "image_id": task.image_id,
        "left": task.left,
        "right": task.right,
        "repeated": task.repeated,
        "gold": task.gold,
    }
    shown = state.shown.get((annotator, task.task_id))
    stored = state.store.add_compare_vote(annotator, state.round.round, record, answer, shown)
    answered = len(state.store.answered_compare(annotator, state.round.round))
    total = len(annotator_round(state, annotator))
    return JSONResponse({"ok": True, "stored": stored, "progress": progress(answered, total)})


async def api_compare_image(request: Request) -> Response:
    annotator = annotator_of(request)
    state: AppState = request.app.state.data
    task = compare_task(state, annotator, request.path_params["n"])
    side = request.path_params["side"]
    if side == "left":
        data = render.compare_view(task.left_path)
    elif side == "right":
        data = render.compare_view(task.right_path)
    elif side == "lq":
        data = render.compare_view(task.lq_path, size_of=task.left_path)
    else:
        raise HTTPException(404, f"no view {side!r} of a compare task")
    return Response(data, media_type="image/png", headers={"Cache-Control": "no-store"})


# ---------------------------------------------------------------- app


async def api_me(request: Request) -> JSONResponse:
    annotator = annotator_of(request)
    state: AppState = request.app.state.data
    return JSONResponse(
        {
            "annotator": annotator,
            "round": state.round.round if state.round else None,
            "compare": state.round is not None,
            "instances": len(state.instances),
        }
    )


async def index(request: Request) -> FileResponse:
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})


async def json_error(request: Request, error: HTTPException) -> JSONResponse:
    return JSONResponse({"error": error.detail}, status_code=error.status_code)


class SecurityHeaders:
    """ASGI wrapper adding :data:`SECURITY_HEADERS` to every HTTP response, errors included."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        await self.app(scope, receive, send_with_headers if scope["type"] == "http" else send)


def create_app(state: AppState) -> SecurityHeaders:
    """The Starlette app over ``state``, wrapped so that even its 500s carry the headers."""
    routes = [
        Route("/", index),
        Mount("/static", app=StaticFiles(directory=STATIC), name="static"),
        Route("/api/me", api_me),
        Route("/api/instances/next", api_instances_next),
        Route("/api/instances/{n:int}", api_instances_vote, methods=["POST"]),
        Route("/api/images/instance/{n:int}/{view}", api_instance_image),
        Route("/api/compare/next", api_compare_next),
        Route("/api/compare/{n:int}", api_compare_vote, methods=["POST"]),
        Route("/api/images/compare/{n:int}/{side}", api_compare_image),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: json_error})
    app.state.data = state
    return SecurityHeaders(app)
