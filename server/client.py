"""Typed Python client for the softserve HTTP API, sync (`SoftserveClient`) and async (`AsyncSoftserveClient`).

Both build the same `httpx.Request`s (`_Calls`) and read responses the same way (`_read`, and
`_GenerateEvents` for a streamed generate); only the sending differs. Errors come back as `SoftserveError`
with the server's status, code and message.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, Union

import httpx

# Training examples: a list of {"input", "target"} dicts (sent as JSON), or JSONL bytes or a JSONL file path
# (sent as a multipart upload, so the server's error messages name the file's line numbers).
Examples = Union[list[dict[str, str]], bytes, str, Path]  # noqa: UP007 (a runtime alias on Python 3.10)
LIST_PAGE_SIZE = 1000  # the server's largest page: a whole listing in the fewest requests


def _file_bytes(file: bytes | str | Path) -> bytes:
    return file if isinstance(file, bytes) else Path(file).read_bytes()


def _jsonl(examples: Examples) -> bytes:
    if isinstance(examples, (bytes, str, Path)):
        return _file_bytes(examples)
    return "".join(json.dumps(example) + "\n" for example in examples).encode()


class SoftserveError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class _Calls:
    """One method per API call, each returning the request to send."""

    def __init__(self, base_url: str, api_key: str | None) -> None:
        self._base = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def _make(self, method: str, path: str, **kwargs: Any) -> httpx.Request:
        return httpx.Request(method, self._base + path, headers=self._headers, **kwargs)

    def generate(
        self,
        task_id: str,
        inputs: str | list[str],
        version: int | None,
        parameters: dict[str, Any],
        stream: bool = False,
        ensemble: bool = False,
    ) -> httpx.Request:
        body: dict[str, Any] = {"task_id": task_id, "inputs": inputs}
        if version is not None:
            body["version"] = version
        if parameters:
            body["parameters"] = parameters
        if stream:
            body["stream"] = True
        if ensemble:
            body["ensemble"] = True
        return self._make("POST", "/v1/generate", json=body)

    def classify(
        self,
        task_id: str,
        inputs: str | list[str],
        labels: list[str] | None,
        length_normalize: bool,
        ensemble: bool = False,
    ) -> httpx.Request:
        body: dict[str, Any] = {"task_id": task_id, "inputs": inputs, "length_normalize": length_normalize}
        if labels is not None:
            body["labels"] = labels
        if ensemble:
            body["ensemble"] = True
        return self._make("POST", "/v1/classify", json=body)

    def embed(self, task_id: str, inputs: str | list[str], version: int | None, normalize: bool) -> httpx.Request:
        model = task_id if version is None else f"{task_id}@{version}"
        return self._make("POST", "/v1/embeddings", json={"model": model, "input": inputs, "normalize": normalize})

    def upload_prompt(self, task_id: str, data: bytes, metadata: dict[str, Any] | None) -> httpx.Request:
        form = {"metadata": json.dumps(metadata)} if metadata else None
        return self._make("PUT", f"/v1/prompts/{task_id}", files={"file": ("prompt", data)}, data=form)

    def list_prompts(self, limit: int | None, cursor: str | None) -> httpx.Request:
        params = {name: value for name, value in (("limit", limit), ("cursor", cursor)) if value is not None}
        return self._make("GET", "/v1/prompts", params=params)

    def get_prompt(self, task_id: str) -> httpx.Request:
        return self._make("GET", f"/v1/prompts/{task_id}")

    def download_prompt(self, task_id: str, version: int, fmt: str) -> httpx.Request:
        return self._make("GET", f"/v1/prompts/{task_id}/versions/{version}", params={"format": fmt})

    def activate(self, task_id: str, version: int) -> httpx.Request:
        return self._make("POST", f"/v1/prompts/{task_id}/activate", json={"version": version})

    def set_ensemble(self, task_id: str, versions: list[int]) -> httpx.Request:
        return self._make("PUT", f"/v1/prompts/{task_id}/ensemble", json={"versions": versions})

    def clear_ensemble(self, task_id: str) -> httpx.Request:
        return self._make("DELETE", f"/v1/prompts/{task_id}/ensemble")

    def delete_prompt(self, task_id: str) -> httpx.Request:
        return self._make("DELETE", f"/v1/prompts/{task_id}")

    def pin(self, task_id: str) -> httpx.Request:
        return self._make("PUT", f"/v1/prompts/{task_id}/pin")

    def unpin(self, task_id: str) -> httpx.Request:
        return self._make("DELETE", f"/v1/prompts/{task_id}/pin")

    def nearest_tokens(self, task_id: str, version: int, k: int) -> httpx.Request:
        return self._make("GET", f"/v1/prompts/{task_id}/versions/{version}/nearest-tokens", params={"k": k})

    def similar_tasks(self, task_id: str, k: int) -> httpx.Request:
        return self._make("GET", f"/v1/prompts/{task_id}/similar", params={"k": k})

    def info(self) -> httpx.Request:
        return self._make("GET", "/v1/info")

    def submit_training_job(
        self, task_id: str, train: Examples, eval: Examples | None, config: dict[str, Any] | None, activate: bool
    ) -> httpx.Request:
        if isinstance(train, list) and (eval is None or isinstance(eval, list)):
            body: dict[str, Any] = {"task_id": task_id, "train": train, "activate": activate}
            if eval is not None:
                body["eval"] = eval
            if config is not None:
                body["config"] = config
            return self._make("POST", "/v1/training-jobs", json=body)
        files = {"train": ("train.jsonl", _jsonl(train))}
        if eval is not None:
            files["eval"] = ("eval.jsonl", _jsonl(eval))
        form = {"task_id": task_id, "activate": "true" if activate else "false"}
        if config is not None:
            form["config"] = json.dumps(config)
        return self._make("POST", "/v1/training-jobs", files=files, data=form)

    def get_job(self, job_id: str) -> httpx.Request:
        return self._make("GET", f"/v1/training-jobs/{job_id}")

    def list_jobs(self) -> httpx.Request:
        return self._make("GET", "/v1/training-jobs")

    def cancel_job(self, job_id: str) -> httpx.Request:
        return self._make("DELETE", f"/v1/training-jobs/{job_id}")


def _read(response: httpx.Response) -> Any:
    if response.is_error:
        try:
            error = response.json()["error"]
            raise SoftserveError(response.status_code, error["code"], error["message"])
        except (ValueError, KeyError, TypeError):
            raise SoftserveError(response.status_code, "http_error", response.text) from None
    if response.status_code == 204:
        return None
    if response.headers.get("content-type", "").startswith("application/json"):
        return response.json()
    return response.content


class _GenerateEvents:
    """Reads a streamed generate's server-sent events line by line: each token event's data, then the final
    event's; an `error` event raises. The status is 200 then: the error came after the stream began."""

    def __init__(self, response: httpx.Response) -> None:
        self.status = response.status_code
        self.ended = False
        self._name = "message"
        self._data: list[str] = []

    def feed(self, line: str) -> dict | None:
        """The event a blank line completes (None for any other line)."""
        if line:
            field, _, value = line.partition(":")  # a line starting with ":" is a comment: field ""
            value = value.removeprefix(" ")
            if field == "event":
                self._name = value
            elif field == "data":
                self._data.append(value)
            return None
        name, data = self._name, "\n".join(self._data)
        self._name, self._data = "message", []
        if not data:
            return None
        event = json.loads(data)
        if name == "error":
            raise SoftserveError(self.status, event["error"]["code"], event["error"]["message"])
        self.ended = name == "end"
        return event

    def incomplete(self) -> SoftserveError:
        return SoftserveError(self.status, "incomplete_stream", "the stream ended before its final event")


class SoftserveClient:
    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None, timeout: float = 60):
        self._calls = _Calls(base_url, api_key)
        self._http = httpx.Client(timeout=timeout)

    def __enter__(self) -> SoftserveClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, request: httpx.Request) -> Any:
        return _read(self._http.send(request))

    def generate(
        self,
        task_id: str,
        inputs: str | list[str],
        version: int | None = None,
        *,
        ensemble: bool = False,
        **parameters: Any,
    ) -> dict:
        """`ensemble=True`: every member of the task's ensemble on each input; the majority text, with `votes`."""
        return self._send(self._calls.generate(task_id, inputs, version, parameters, ensemble=ensemble))

    def generate_stream(
        self, task_id: str, input: str, version: int | None = None, **parameters: Any
    ) -> Iterator[dict]:
        """Yields `{"index", "token": {"id", "text"}}` per token as the server decodes it, then the final
        `{"task_id", "prompt_version", "finish_reason", "text", "num_tokens"}`. Leaving the loop early closes the
        connection, and the server stops decoding the row. An error after the stream began raises `SoftserveError`
        with status 200 and the error's code (`deadline_exceeded`...)."""
        response = self._http.send(self._calls.generate(task_id, input, version, parameters, stream=True), stream=True)
        try:
            if response.is_error:
                response.read()
                _read(response)
            events = _GenerateEvents(response)
            for line in response.iter_lines():
                event = events.feed(line)
                if event is not None:
                    yield event
                if events.ended:
                    return
            raise events.incomplete()
        finally:
            response.close()

    def classify(
        self,
        task_id: str,
        inputs: str | list[str],
        labels: list[str] | None = None,
        length_normalize: bool = False,
        ensemble: bool = False,
    ) -> dict:
        """`ensemble=True`: the members' probs averaged, with each member's label and their `agreement`."""
        return self._send(self._calls.classify(task_id, inputs, labels, length_normalize, ensemble))

    def embed(
        self, task_id: str, inputs: str | list[str], version: int | None = None, normalize: bool = True
    ) -> list[list[float]]:
        """Each input's embedding with the task's prompt (`POST /v1/embeddings`), in order."""
        answer = self._send(self._calls.embed(task_id, inputs, version, normalize))
        return [item["embedding"] for item in answer["data"]]

    def upload_prompt(self, task_id: str, file: bytes | str | Path, metadata: dict[str, Any] | None = None) -> dict:
        return self._send(self._calls.upload_prompt(task_id, _file_bytes(file), metadata))

    def list_prompts(self) -> list[dict]:
        """Every task of the tenant, by task id: follows the pages' cursors to the last one."""
        prompts: list[dict] = []
        cursor = None
        while True:
            page = self.list_prompts_page(LIST_PAGE_SIZE, cursor)
            prompts += page["prompts"]
            if (cursor := page["next_cursor"]) is None:
                return prompts

    def list_prompts_page(self, limit: int | None = None, cursor: str | None = None) -> dict:
        """One page: `prompts`, `has_more` and `next_cursor` (pass it back for the next page; None: the last)."""
        return self._send(self._calls.list_prompts(limit, cursor))

    def get_prompt(self, task_id: str) -> dict:
        return self._send(self._calls.get_prompt(task_id))

    def download_prompt(self, task_id: str, version: int, fmt: str = "safetensors") -> bytes:
        return self._send(self._calls.download_prompt(task_id, version, fmt))

    def activate(self, task_id: str, version: int) -> dict:
        return self._send(self._calls.activate(task_id, version))

    def set_ensemble(self, task_id: str, versions: list[int]) -> dict:
        """Makes these versions the task's ensemble (what `ensemble=True` requests serve); returns the task."""
        return self._send(self._calls.set_ensemble(task_id, versions))

    def clear_ensemble(self, task_id: str) -> dict:
        return self._send(self._calls.clear_ensemble(task_id))

    def pin(self, task_id: str) -> dict:
        """Keeps the task's prompt on every replica's device, never evicted; returns its listing entry."""
        return self._send(self._calls.pin(task_id))

    def unpin(self, task_id: str) -> dict:
        return self._send(self._calls.unpin(task_id))

    def delete_prompt(self, task_id: str) -> None:
        self._send(self._calls.delete_prompt(task_id))

    def nearest_tokens(self, task_id: str, version: int, k: int = 5) -> dict:
        """Each prompt position's k nearest vocabulary tokens (id, text, cosine similarity) and the task's labels
        among them."""
        return self._send(self._calls.nearest_tokens(task_id, version, k))

    def similar_tasks(self, task_id: str, k: int = 5) -> dict:
        """The caller's k tasks whose active prompts are most like this task's (cosine of the mean rows)."""
        return self._send(self._calls.similar_tasks(task_id, k))

    def info(self) -> dict:
        return self._send(self._calls.info())

    def submit_training_job(
        self,
        task_id: str,
        train: Examples,
        eval: Examples | None = None,
        config: dict[str, Any] | None = None,
        activate: bool = True,
    ) -> dict:
        """Queues a prompt-tuning job; returns `{"job_id", "state"}`."""
        return self._send(self._calls.submit_training_job(task_id, train, eval, config, activate))

    def get_job(self, job_id: str) -> dict:
        return self._send(self._calls.get_job(job_id))

    def list_jobs(self) -> list[dict]:
        return self._send(self._calls.list_jobs())["jobs"]

    def cancel_job(self, job_id: str) -> dict:
        return self._send(self._calls.cancel_job(job_id))


class AsyncSoftserveClient:
    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None, timeout: float = 60):
        self._calls = _Calls(base_url, api_key)
        self._http = httpx.AsyncClient(timeout=timeout)

    async def __aenter__(self) -> AsyncSoftserveClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, request: httpx.Request) -> Any:
        return _read(await self._http.send(request))

    async def generate(
        self,
        task_id: str,
        inputs: str | list[str],
        version: int | None = None,
        *,
        ensemble: bool = False,
        **parameters: Any,
    ) -> dict:
        return await self._send(self._calls.generate(task_id, inputs, version, parameters, ensemble=ensemble))

    async def generate_stream(
        self, task_id: str, input: str, version: int | None = None, **parameters: Any
    ) -> AsyncIterator[dict]:
        """As `SoftserveClient.generate_stream`; `aclose()` the iterator (or finish it) to close the connection."""
        request = self._calls.generate(task_id, input, version, parameters, stream=True)
        response = await self._http.send(request, stream=True)
        try:
            if response.is_error:
                await response.aread()
                _read(response)
            events = _GenerateEvents(response)
            async for line in response.aiter_lines():
                event = events.feed(line)
                if event is not None:
                    yield event
                if events.ended:
                    return
            raise events.incomplete()
        finally:
            await response.aclose()

    async def classify(
        self,
        task_id: str,
        inputs: str | list[str],
        labels: list[str] | None = None,
        length_normalize: bool = False,
        ensemble: bool = False,
    ) -> dict:
        return await self._send(self._calls.classify(task_id, inputs, labels, length_normalize, ensemble))

    async def embed(
        self, task_id: str, inputs: str | list[str], version: int | None = None, normalize: bool = True
    ) -> list[list[float]]:
        answer = await self._send(self._calls.embed(task_id, inputs, version, normalize))
        return [item["embedding"] for item in answer["data"]]

    async def upload_prompt(
        self, task_id: str, file: bytes | str | Path, metadata: dict[str, Any] | None = None
    ) -> dict:
        return await self._send(self._calls.upload_prompt(task_id, _file_bytes(file), metadata))

    async def list_prompts(self) -> list[dict]:
        """Every task of the tenant, by task id: follows the pages' cursors to the last one."""
        prompts: list[dict] = []
        cursor = None
        while True:
            page = await self.list_prompts_page(LIST_PAGE_SIZE, cursor)
            prompts += page["prompts"]
            if (cursor := page["next_cursor"]) is None:
                return prompts

    async def list_prompts_page(self, limit: int | None = None, cursor: str | None = None) -> dict:
        """One page: `prompts`, `has_more` and `next_cursor` (pass it back for the next page; None: the last)."""
        return await self._send(self._calls.list_prompts(limit, cursor))

    async def get_prompt(self, task_id: str) -> dict:
        return await self._send(self._calls.get_prompt(task_id))

    async def download_prompt(self, task_id: str, version: int, fmt: str = "safetensors") -> bytes:
        return await self._send(self._calls.download_prompt(task_id, version, fmt))

    async def activate(self, task_id: str, version: int) -> dict:
        return await self._send(self._calls.activate(task_id, version))

    async def set_ensemble(self, task_id: str, versions: list[int]) -> dict:
        return await self._send(self._calls.set_ensemble(task_id, versions))

    async def clear_ensemble(self, task_id: str) -> dict:
        return await self._send(self._calls.clear_ensemble(task_id))

    async def delete_prompt(self, task_id: str) -> None:
        await self._send(self._calls.delete_prompt(task_id))

    async def pin(self, task_id: str) -> dict:
        return await self._send(self._calls.pin(task_id))

    async def unpin(self, task_id: str) -> dict:
        return await self._send(self._calls.unpin(task_id))

    async def nearest_tokens(self, task_id: str, version: int, k: int = 5) -> dict:
        return await self._send(self._calls.nearest_tokens(task_id, version, k))

    async def similar_tasks(self, task_id: str, k: int = 5) -> dict:
        return await self._send(self._calls.similar_tasks(task_id, k))

    async def info(self) -> dict:
        return await self._send(self._calls.info())

    async def submit_training_job(
        self,
        task_id: str,
        train: Examples,
        eval: Examples | None = None,
        config: dict[str, Any] | None = None,
        activate: bool = True,
    ) -> dict:
        return await self._send(self._calls.submit_training_job(task_id, train, eval, config, activate))

    async def get_job(self, job_id: str) -> dict:
        return await self._send(self._calls.get_job(job_id))

    async def list_jobs(self) -> list[dict]:
        return (await self._send(self._calls.list_jobs()))["jobs"]

    async def cancel_job(self, job_id: str) -> dict:
        return await self._send(self._calls.cancel_job(job_id))
