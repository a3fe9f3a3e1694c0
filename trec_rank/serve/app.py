"""The HTTP app: POST /predict, GET /health, GET /metadata over one exported artifact (docs/serving.md).

A request's life: the body is read with a size cap and validated by `PredictRequest` (pydantic), its rows
become an Arrow table (`rows.RowConverter.table`: missing/unknown/null fields, JSON types), the micro-batcher
queues it, and the model thread converts each batch with `to_batch` and calls `Artifact.predict`. Requests
are merged only when their Arrow schemas agree (a field sent as integers by one client and strings by
another is two model calls). If a merged batch fails, each of its requests is scored alone, so a bad
request gets its own 400 naming its row and field and never fails the requests it was batched with.
Every client mistake is a 400 with `{"error": "row R: field 'F': ..."}`; anything else is a 500 with the
message, and the worker goes on serving.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, ValidationError

from trec_rank.serve.batcher import MicroBatcher, Result
from trec_rank.serve.rows import RequestError, RowConverter

if TYPE_CHECKING:  # the app only calls what it is given; cli.py loads it
    from trec_rank.export.artifact import Artifact

log = logging.getLogger(__name__)
MAX_BODY_BYTES = 64 * 2**20  # a body is read whole before parsing: cap what one request can make us hold


class PredictRequest(BaseModel):
    """`{"rows": [{"<field>": value, ...}, ...]}`; the fields and their JSON types depend on the model
    (GET /metadata), so a row is checked against the schema by `RowConverter`, not by this class."""

    model_config = ConfigDict(extra="forbid")
    rows: list[dict[str, Any]]


class PredictResponse(BaseModel):
    """`{"scores": {"<output>": [p_row0, p_row1, ...]}}`: one probability per output per row, in row order."""

    scores: dict[str, list[float]]


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _pydantic_message(err: ValidationError) -> str:
    """The first error as `row R: ...` (or the JSON path) with pydantic's own words."""
    first = err.errors(include_url=False)[0]
    loc = [str(p) for p in first["loc"]]
    where = f"row {loc[1]}" if len(loc) >= 2 and loc[0] == "rows" else ".".join(loc) or "body"
    return f"{where}: {first['msg']}"


class Scorer:
    """Tables -> per table its scores or the exception it failed with (runs on the model thread)."""

    def __init__(self, artifact: Artifact, converter: RowConverter) -> None:
        self.artifact, self.converter = artifact, converter

    def __call__(self, tables: list[pa.Table]) -> list[Result]:
        results: list[Result] = [None] * len(tables)
        groups: dict[str, list[int]] = {}
        for i, t in enumerate(tables):
            groups.setdefault(t.schema.to_string(), []).append(i)
        for idx in groups.values():
            for i, r in zip(idx, self._group([tables[i] for i in idx]), strict=True):
                results[i] = r
        return results

    def _group(self, tables: list[pa.Table]) -> list[Result]:
        try:
            merged = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
            batch = self.converter.batch(merged, locate=len(tables) == 1)
            with torch.no_grad():
                probs = self.artifact.predict(batch)
            out = {name: probs[name].detach().float().cpu() for name in self.artifact.outputs}
        except Exception as err:
            if len(tables) == 1:
                return [err]
            return [r for t in tables for r in self._group([t])]  # find the culprit, score the others
        results, start = [], 0
        for t in tables:
            results.append({k: v[start:start + t.num_rows].tolist() for k, v in out.items()})
            start += t.num_rows
        return results


async def _body(request: Request) -> bytes | None:
    """The body, or None when it exceeds MAX_BODY_BYTES (read in chunks: Content-Length may be absent or lie)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(artifact: Artifact, max_batch_rows: int, max_wait_ms: float) -> FastAPI:
    """The app over one loaded artifact; the batcher's worker lives as long as the app (lifespan)."""
    contract = artifact.meta.get("contract", {})
    converter = RowConverter(artifact.config, max_batch_rows, contract.get("aligned", []), contract.get("single", []))
    batcher = MicroBatcher(Scorer(artifact, converter), max_batch_rows, max_wait_ms / 1000)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker = asyncio.create_task(batcher.run())
        yield
        worker.cancel()
        batcher.close()

    app = FastAPI(title="trec-rank serve", lifespan=lifespan)

    @app.post("/predict", response_model=PredictResponse,
              responses={400: {"description": "a client mistake: {\"error\": \"row R: field 'F': ...\"}"}},
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": PredictRequest.model_json_schema()}}}})
    async def predict(request: Request) -> Any:
        body = await _body(request)
        if body is None:
            return _error(413, f"body: larger than {MAX_BODY_BYTES // 2**20} MiB; send fewer rows per request")
        try:
            rows = PredictRequest.model_validate_json(body).rows
            table = converter.table(rows)
        except ValidationError as err:
            return _error(400, _pydantic_message(err))
        except RequestError as err:
            return _error(400, str(err))
        try:
            return PredictResponse(scores=await batcher.submit(table))
        except RequestError as err:
            return _error(400, str(err))
        except Exception as err:
            log.exception("scoring failed")
            return _error(500, f"scoring failed: {type(err).__name__}: {err}")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        c = batcher.counters
        return {"status": "ok", "outputs": artifact.outputs, "requests": c.requests, "batches": c.batches,
                "rows": c.rows, "queued": batcher.queue.qsize()}

    @app.get("/metadata")
    async def metadata() -> dict[str, Any]:
        return artifact.meta

    return app
