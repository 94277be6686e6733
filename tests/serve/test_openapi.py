"""/openapi.json: it describes every route, auth applies to it, and schemathesis finds no 5xx and no response
outside the schema when it drives a live server (a bounded number of examples per route)."""

import subprocess
import sys

import httpx
import pytest

from glmkit.serve.app import build_app

from .conftest import LiveServer, make_state

KEY = "sekret"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def keyed_server(model_and_tokenizer):
    server = LiveServer(make_state(*model_and_tokenizer, api_key=KEY))
    yield server
    server.stop()


def _routes(routes):
    for r in routes:
        if hasattr(r, "original_router"):  # FastAPI's included routers
            yield from _routes(r.original_router.routes)
        else:
            yield r


def test_openapi_describes_every_route(keyed_server):
    app = build_app(keyed_server.state)
    served = {
        (r.path, m.lower())
        for r in _routes(app.router.routes)
        for m in r.methods
        if m != "HEAD" and r.path != "/openapi.json"
    }
    doc = httpx.get(f"http://{keyed_server.url}/openapi.json", headers=AUTH).json()
    described = {(p, m) for p, ops in doc["paths"].items() for m in ops}
    assert served == described
    completions = doc["paths"]["/v1/completions"]["post"]
    request = completions["requestBody"]["content"]["application/json"]["schema"]
    assert request == {"$ref": "#/components/schemas/CompletionRequest"}
    assert set(completions["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    limits = keyed_server.state.config.limits
    props = doc["components"]["schemas"]["CompletionRequest"]["properties"]
    assert props["max_tokens"]["anyOf"][0]["maximum"] == limits.max_tokens
    assert doc["components"]["schemas"]["_name"]["enum"] == sorted(keyed_server.state.models)
    assert doc["security"] == [{"bearer": []}] and doc["paths"]["/v2/health/live"]["get"]["security"] == []


def test_openapi_needs_the_key(keyed_server):
    r = httpx.get(f"http://{keyed_server.url}/openapi.json")
    assert r.status_code == 401 and "API key" in r.json()["error"]
    assert httpx.get(f"http://{keyed_server.url}/openapi.json", headers=AUTH).status_code == 200


CHECKS = [
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    "ignored_auth",
]


def test_schemathesis_finds_no_5xx_and_no_response_outside_the_schema(keyed_server, tmp_path):
    """schemathesis' own CLI (its pytest plugin does not load on pytest 9): the schema's examples, boundary values
    of every schema (coverage) and 25 generated requests per route, valid and invalid (``--mode all``), with a
    fixed seed and no shrinking so the run is bounded and repeatable. The routes that unload models run last, in
    a run of their own, so that the others meet ready models."""
    cli = "from schemathesis.cli import schemathesis; schemathesis()"  # the console script, on this interpreter
    cmd = [sys.executable, "-c", cli, "run", f"http://{keyed_server.url}/openapi.json"]
    cmd += ["-H", f"Authorization: Bearer {KEY}", "--checks", ",".join(CHECKS), "--mode", "all"]
    cmd += ["--max-examples", "25", "--seed", "0", "--no-shrink", "--workers", "1", "--request-timeout", "60"]
    cmd += ["--phases", "examples,coverage,fuzzing", "--suppress-health-check", "all"]
    repository = "^/v2/repository/models/"
    for only in (["--exclude-path-regex", repository], ["--include-path-regex", repository]):
        done = subprocess.run(cmd + only, capture_output=True, text=True, timeout=1200, cwd=tmp_path)
        assert done.returncode == 0, done.stdout[-20000:] + done.stderr[-2000:]
        assert "Test cases:" in done.stdout
