"""The Responses API routes: POST /v1/responses (JSON, or named SSE events with stream=true), GET and DELETE
/v1/responses/{id}, GET /v1/responses/{id}/input_items. The work is in server/responses_run.py."""
from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response

from server import sse
from server.responses_items import page_input_items
from server.responses_protocol import InputItemList, InputItemsQuery, ResponseDeleted, ResponseObject, ResponsesRequest
from server.responses_run import collect_response, delete_response, get_record, run_events, start_response
from server.routes import CLIENT_CLOSED, ERRORS, READ_ERRORS, ready

router = APIRouter()
SSE_200 = {200: {"content": {"text/event-stream": {}}, "description": "The response, or with stream=true its "
                 "events (event: <type>, data: the event as JSON; the last is response.completed, "
                 "response.incomplete or response.failed)"}}


def _json(model) -> JSONResponse:
    return JSONResponse(model.model_dump(mode="json", by_alias=True))


@router.post("/v1/responses", response_model=ResponseObject, responses={**SSE_200, **ERRORS})
async def create_response(body: ResponsesRequest, request: Request):
    state = ready(request)
    run = await start_response(state, body)
    on_gone = state.metrics.client_disconnects.inc
    if body.stream:
        return sse.SSEResponse(run_events(run, catch=True), on_disconnect=on_gone, named=True)
    result = await sse.until_disconnect(request.receive, collect_response(run_events(run, catch=False)), on_gone)
    return Response(status_code=CLIENT_CLOSED) if result is None else _json(result)


@router.get("/v1/responses/{response_id}", response_model=ResponseObject, responses=READ_ERRORS)
async def retrieve_response(response_id: str, request: Request):
    record = await get_record(ready(request), response_id)
    return _json(record.response)


@router.delete("/v1/responses/{response_id}", response_model=ResponseDeleted, responses=READ_ERRORS)
async def remove_response(response_id: str, request: Request):
    await delete_response(ready(request), response_id)
    return _json(ResponseDeleted(id=response_id))


@router.get("/v1/responses/{response_id}/input_items", response_model=InputItemList,
            responses={**READ_ERRORS, 400: READ_ERRORS[404]})
async def input_items(response_id: str, request: Request, after: str | None = None,
                      limit: Annotated[int, Query(ge=1, le=100)] = 20, order: Literal["asc", "desc"] = "desc",
                      include: Annotated[list[str] | None, Query()] = None):
    """This response's own input items (not those of the responses before it), newest first by default."""
    record = await get_record(ready(request), response_id)
    query = InputItemsQuery(after=after, limit=limit, order=order, include=include)
    return _json(page_input_items(record.input, query))
