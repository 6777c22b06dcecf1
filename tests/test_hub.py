"""Hub round trips through the real huggingface_hub client against ltzoo.hub_server.

Every test talks to the local server started by the ``hub_server`` fixture (its URL is
HF_ENDPOINT, set in conftest.py before huggingface_hub is imported).
"""

from __future__ import annotations

import base64
import http.client
import json
from pathlib import Path

import httpx
import pytest
import torch
from checks import same_weights
from huggingface_hub import CommitOperationAdd, HfApi, constants
from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError
from safetensors.torch import save_file

from ltzoo import zoo
from ltzoo.cli import main as cli_main
from ltzoo.hub_server import HubServer
from ltzoo.hub_server.validation import NAME_PATTERN
from ltzoo.zoo import hub_io
from ltzoo.zoo.config import PreprocessConfig
from ltzoo.zoo.ensemble import WEIGHTS_NAME

X28 = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def _make(seed: int = 0, **kwargs) -> zoo.Ensemble:
    """An ensemble whose weights *and* buffers (BN statistics) are all non-default."""
    torch.manual_seed(seed)
    kwargs.setdefault("num_classes", 10)
    kwargs.setdefault("class_counts", [500 // (i + 1) for i in range(kwargs["num_classes"])])
    model = zoo.Ensemble(zoo.EnsembleConfig(temperature=1.3, name=f"test-{seed}", **kwargs))
    with torch.no_grad():
        for buf in model.buffers():
            if buf.is_floating_point():
                buf.copy_(torch.rand_like(buf) + 0.5)
    return model.eval()


def _small(seed: int = 0) -> zoo.Ensemble:
    return _make(seed, num_experts=1, layout="single")


def _same_outputs(a: zoo.Ensemble, b: zoo.Ensemble, x: torch.Tensor = X28) -> bool:
    with torch.inference_mode():
        return torch.equal(a.expert_logits(x), b.expert_logits(x))


def _config_without_source(model: zoo.Ensemble) -> dict:
    cfg = model.config.to_dict()
    cfg["extra"] = {k: v for k, v in cfg["extra"].items() if k != "source"}
    return cfg


@pytest.fixture
def offline(monkeypatch):
    """HF_HUB_OFFLINE=1 at runtime (huggingface_hub reads constants.HF_HUB_OFFLINE per request)."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


# --- local save/load ---------------------------------------------------------------------------
LAYOUTS = {
    "independent": dict(backbone="resnet32", num_experts=3),
    "shared": dict(backbone="resnet32", num_experts=3, layout="shared", shared_stages=2),
    "single-cosine-neck": dict(
        backbone="resnet32",
        num_experts=1,
        layout="single",
        head="cosine",
        head_bias=False,
        neck_dim=16,
    ),
    "torchvision-resnet50": dict(
        backbone="resnet50",
        num_classes=5,
        num_experts=1,
        layout="single",
        preprocess=PreprocessConfig(input_size=(32, 32), channels=1, mean=(0.5,), std=(0.25,)),
    ),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_save_pretrained_round_trip_is_bitwise(tmp_path, layout):
    model = _make(1, **LAYOUTS[layout])
    model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "README.md",
        "config.json",
        WEIGHTS_NAME,
    ]
    loaded = zoo.load(str(tmp_path / "m"))
    size = model.config.preprocess.input_size
    x = torch.randn(
        3, model.config.preprocess.channels, *size, generator=torch.Generator().manual_seed(1)
    )
    assert _same_outputs(model, loaded, x)
    assert _config_without_source(loaded) == model.config.to_dict()
    assert loaded.config.extra["source"] == {"local": str((tmp_path / "m").resolve())}
    assert not loaded.training


def test_server_repo_id_charset_matches_hub_io():
    assert hub_io.REPO_ID.pattern == rf"\A{NAME_PATTERN}/{NAME_PATTERN}\Z"


# --- push / load by repo id, revisions, branches ----------------------------------------------
def test_push_then_load_by_repo_id_revision_and_branch(hub_server):
    repo = "test-org/push-roundtrip"
    first, second, on_dev = _small(10), _small(11), _small(12)
    assert not same_weights(first, second)

    c1 = zoo.push_to_hub(first, repo)
    loaded = zoo.load(repo)
    assert _same_outputs(first, loaded)
    assert _config_without_source(loaded) == first.config.to_dict()
    assert loaded.config.extra["source"] == {"repo_id": repo, "revision": "main"}

    c2 = zoo.push_to_hub(second, repo, commit_message="second model")
    assert len(c1) == len(c2) == 40 and c1 != c2
    assert same_weights(second, zoo.load(repo))
    # old weights stay reachable by commit id, as an argument or as "repo@rev"
    assert same_weights(first, zoo.load(repo, revision=c1))
    assert same_weights(first, zoo.load(f"{repo}@{c1}"))
    assert zoo.load(f"{repo}@{c1}").config.extra["source"]["revision"] == c1

    c3 = zoo.push_to_hub(on_dev, repo, revision="dev")
    assert same_weights(on_dev, zoo.load(repo, revision="dev"))
    assert same_weights(on_dev, zoo.load(f"{repo}@dev"))
    assert same_weights(second, zoo.load(repo))  # main did not move

    api = HfApi()
    refs = {b.name: b.target_commit for b in api.list_repo_refs(repo).branches}
    assert refs == {"main": c2, "dev": c3}
    titles = [c.title for c in api.list_repo_commits(repo)]
    assert titles[:2] == ["second model", "Upload ltzoo ensemble"]
    assert api.model_info(repo, revision=c1).sha == c1
    api.create_branch(repo, branch="from-first", revision=c1)
    assert same_weights(first, zoo.load(f"{repo}@from-first"))
    assert sorted(api.list_repo_files(repo)) == [
        ".gitattributes",
        "README.md",
        "config.json",
        WEIGHTS_NAME,
    ]


def test_unchanged_upload_makes_no_empty_commit(hub_server, tmp_path):
    # (re-saving a model is not byte-stable: safetensors' header order varies, so
    # upload one saved directory twice)
    repo = "test-org/idempotent"
    _small(13).save_pretrained(tmp_path / "m")
    api = HfApi()
    api.create_repo(repo)
    c1 = api.upload_folder(repo_id=repo, folder_path=tmp_path / "m").oid
    c2 = api.upload_folder(
        repo_id=repo, folder_path=tmp_path / "m"
    ).oid  # preupload: oids unchanged
    assert c1 == c2 == api.model_info(repo).sha


# --- offline -------------------------------------------------------------------------------------
def test_offline_load_uses_cache_and_explains_missing_models(
    hub_server, hub_cache, offline, monkeypatch
):
    model = _small(20)
    with monkeypatch.context() as online:
        online.setattr(constants, "HF_HUB_OFFLINE", False)
        zoo.push_to_hub(model, "test-org/offline-cached")
        zoo.push_to_hub(_small(21), "test-org/offline-never-downloaded")
        path = zoo.download("test-org/offline-cached")
    assert path.is_relative_to(hub_cache)

    assert same_weights(model, zoo.load("test-org/offline-cached"))
    with pytest.raises(zoo.ModelNotAvailableError) as err:
        zoo.load("test-org/offline-never-downloaded")
    msg = str(err.value)
    assert "test-org/offline-never-downloaded" in msg and "revision main" in msg
    assert "ltzoo train" in msg
    with pytest.raises(zoo.ModelNotAvailableError, match="revision v2"):
        zoo.load("test-org/offline-cached@v2")


# --- errors --------------------------------------------------------------------------------------
def test_missing_repo_and_revision_raise_model_not_available(hub_server):
    with pytest.raises(zoo.ModelNotAvailableError, match="test-org/does-not-exist") as err:
        zoo.load("test-org/does-not-exist")
    assert isinstance(err.value.__cause__, RepositoryNotFoundError)

    zoo.push_to_hub(_small(30), "test-org/has-main")
    with pytest.raises(zoo.ModelNotAvailableError, match="no-such-branch") as err:
        zoo.load("test-org/has-main", revision="no-such-branch")
    assert isinstance(err.value.__cause__, RevisionNotFoundError)
    with pytest.raises(zoo.ModelNotAvailableError) as err:
        zoo.load(f"test-org/has-main@{'0' * 40}")
    assert isinstance(err.value.__cause__, RevisionNotFoundError)


@pytest.mark.parametrize("corruption", ["garbage", "truncated"])
def test_corrupted_weights_on_the_hub_give_a_clear_error(hub_server, tmp_path, corruption):
    repo = f"test-org/corrupt-{corruption}"
    model = _small(40)
    zoo.push_to_hub(model, repo)
    if corruption == "garbage":
        data = b"\x00garbage, not safetensors" * 100
    else:
        save_file(dict(model.state_dict()), str(tmp_path / "w.safetensors"))
        full = (tmp_path / "w.safetensors").read_bytes()
        data = full[: len(full) // 2]
    HfApi().create_commit(
        repo,
        [CommitOperationAdd(WEIGHTS_NAME, data)],
        commit_message=f"corrupt the weights ({corruption})",
    )
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        zoo.load(repo)


def test_registry_model_without_weights(hub_server, monkeypatch):
    monkeypatch.delenv("LTZOO_HUB_ORG", raising=False)
    model = zoo.load("ecl-resnext50-imagenetlt", pretrained=False)
    assert model.num_experts == 3
    assert model.config.num_classes == len(model.config.class_names) == 1000
    assert model.config.class_names[0] == "tench"
    with pytest.raises(zoo.ModelNotAvailableError, match="ltzoo/ecl-resnext50-imagenetlt"):
        zoo.load("ecl-resnext50-imagenetlt", pretrained=True)


# --- CLI ------------------------------------------------------------------------------------------
def test_cli_push_and_download(hub_server, tmp_path, capsys):
    model = _small(50)
    model.save_pretrained(tmp_path / "run")
    assert cli_main(["push", str(tmp_path / "run"), "test-org/cli"]) == 0
    assert "test-org/cli" in capsys.readouterr().out
    assert cli_main(["download", "test-org/cli"]) == 0
    path = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert (path / WEIGHTS_NAME).is_file()
    assert same_weights(model, zoo.load(str(path)))


# --- hostile input ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hostile_hub(tmp_path_factory):
    """A separate server with a 64 KiB body limit; yields (client, store dir, outside dir)."""
    base = tmp_path_factory.mktemp("hostile")
    store, outside = base / "store", base / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("TOP SECRET")
    with (
        HubServer(store, max_body_bytes=64 * 1024) as server,
        httpx.Client(base_url=server.url) as client,
    ):
        r = client.post("/api/repos/create", json={"organization": "org", "name": "repo"})
        assert r.status_code == 200, r.text
        yield client, store, outside


def _ndjson(*items) -> bytes:
    return b"".join(json.dumps(i).encode() + b"\n" for i in items)


HEADER = {"key": "header", "value": {"summary": "hostile"}}


def _file(path: str, content: bytes = b"x") -> dict:
    return {
        "key": "file",
        "value": {
            "path": path,
            "content": base64.b64encode(content).decode(),
            "encoding": "base64",
        },
    }


HOSTILE = [
    # (method, url, kwargs, expected status, expected X-Error-Code)
    ("GET", "/api/models/%2e%2e/repo", {}, 400, None),
    ("GET", "/api/models/org/%2e%2e%2f%2e%2e%2foutside", {}, 404, None),  # decodes to more segments: no route
    ("GET", "/api/models/org/repo/revision/%2e%2e", {}, 404, "RevisionNotFound"),
    ("GET", "/api/models/org/repo/tree/main/%2e%2e/%2e%2e", {}, 400, None),
    ("GET", "/org/repo/resolve/main/%2e%2e/%2e%2e/outside/secret.txt", {}, 400, None),
    ("GET", "/org/repo/resolve/main/..%2f..%2foutside%2fsecret.txt", {}, 400, None),
    ("GET", "/org/repo/resolve/main//etc/passwd", {}, 400, None),
    ("GET", "/org/repo/resolve/main/a%5c..%5csecret.txt", {}, 400, None),
    ("GET", "/org/repo/resolve/main/a%00b", {}, 400, None),
    ("GET", "/org/repo/resolve/main/" + "a" * 2000, {}, 400, None),
    ("HEAD", "/org/repo/resolve/%2e%2e/config.json", {}, 404, "RevisionNotFound"),
    ("GET", "/org/repo/resolve/main/missing.txt", {}, 404, "EntryNotFound"),
    ("GET", "/org/repo/resolve/no-such-branch/config.json", {}, 404, "RevisionNotFound"),
    ("GET", "/api/models/org/unknown", {}, 404, "RepoNotFound"),
    ("GET", "/api/models/org/unknown/refs", {}, 404, "RepoNotFound"),
    ("GET", "/api/models/org/unknown/tree/main", {}, 404, "RepoNotFound"),
    ("GET", "/org/unknown/resolve/main/config.json", {}, 404, "RepoNotFound"),
    ("POST", "/api/models/org/unknown/preupload/main", {"json": {"files": []}}, 404, "RepoNotFound"),
    ("POST", "/api/models/org/unknown/commit/main", {"content": _ndjson(HEADER)}, 404, "RepoNotFound"),
    ("POST", "/api/repos/create", {"json": {"organization": "..", "name": "x"}}, 400, None),
    ("POST", "/api/repos/create", {"json": {"organization": "org", "name": "../../outside"}}, 400, None),
    ("POST", "/api/repos/create", {"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, None),
    ("POST", "/api/repos/create", {"json": ["a", "list"]}, 400, None),
    ("POST", "/api/models/org/repo/preupload/main", {"json": {"files": [{"path": "../x"}]}}, 400, None),
    ("POST", "/api/models/org/repo/preupload/main", {"content": b"\xff\xfe"}, 400, None),
    ("POST", "/api/models/org/repo/branch/%2e%2e", {"json": {}}, 400, None),
    ("POST", "/api/models/org/repo/commit/main", {"content": b"not json\n"}, 400, None),
    ("POST", "/api/models/org/repo/commit/main", {"content": _ndjson(_file("a.txt"))}, 400, None),
    ("POST", "/api/models/org/repo/commit/main", {"content": _ndjson(HEADER, {"key": "file"})}, 400, None),
    ("POST", "/api/models/org/repo/commit/main", {"content": _ndjson(HEADER, _file("../../outside/evil.txt"))}, 400, None),
    ("POST", "/api/models/org/repo/commit/main", {"content": _ndjson(HEADER, _file("/abs/evil.txt"))}, 400, None),
    ("POST", "/api/models/org/repo/commit/main", {"content": _ndjson(HEADER, _file("a\\..\\evil.txt"))}, 400, None),
    ("POST", "/api/models/org/repo/commit/main", {"content": _ndjson(HEADER, {"key": "file", "value": {"path": "a.txt", "content": "!!not base64!!", "encoding": "base64"}})}, 400, None),
    ("POST", "/api/models/org/repo/commit/main", {"content": _ndjson(HEADER, _file("ok.txt"), {"key": "sneaky", "value": {"path": "b"}})}, 400, None),
    ("POST", "/api/models/org/repo/commit/main", {"content": _ndjson({"key": "header", "value": {"summary": "x", "parentCommit": "f" * 40}}, _file("a.txt"))}, 412, None),
    ("POST", "/api/models/org/repo/commit/no-such-branch", {"content": _ndjson(HEADER, _file("a.txt"))}, 404, "RevisionNotFound"),
    ("POST", "/api/models/org/repo/commit/main", {"content": _ndjson(HEADER, _file("big.bin", b"\0" * 100_000))}, 413, None),
    ("POST", "/api/models/org/repo/commit/main", {"content": _ndjson(HEADER, _file("a.txt")), "params": {"create_pr": "1"}}, 400, None),
]  # fmt: skip


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize(("method", "url", "kwargs", "status", "code"), HOSTILE)
def test_hostile_requests_get_json_4xx_and_write_nothing(
    hostile_hub, method, url, kwargs, status, code
):
    client, store, outside = hostile_hub
    before_outside = _snapshot(outside.parent / "outside")
    refs_before = client.get("/api/models/org/repo/refs").json()
    r = client.request(method, url, **kwargs)
    assert r.status_code == status, r.text
    if method != "HEAD":
        assert isinstance(r.json().get("error"), str), r.text
    assert r.headers.get("X-Error-Code") == code
    assert "TOP SECRET" not in r.text
    assert client.get("/api/models/org/repo/refs").json() == refs_before  # nothing committed
    assert _snapshot(outside) == before_outside
    assert sorted(p.name for p in store.parent.iterdir()) == ["outside", "store"]
    assert sorted(p.name for p in store.iterdir()) == ["blobs", "repos", "tmp"]
    assert [p.name for p in (store / "repos").iterdir()] == ["org"]
    assert list((store / "tmp").iterdir()) == []


def test_literal_dot_dot_in_raw_request_line(hostile_hub):
    """httpx normalises literal '../' away, so send the request line as-is with http.client."""
    client, _, _ = hostile_hub
    conn = http.client.HTTPConnection(client.base_url.host, client.base_url.port, timeout=10)
    try:
        for path in (
            "/org/repo/resolve/main/../../outside/secret.txt",
            "/../../outside/secret.txt",
        ):
            conn.request("GET", path)
            resp = conn.getresponse()
            body = resp.read()
            assert 400 <= resp.status < 500 and b"TOP SECRET" not in body
            assert "error" in json.loads(body)
    finally:
        conn.close()


def test_hostile_server_still_serves_valid_commits(hostile_hub):
    client, _, _ = hostile_hub
    head = client.get("/api/models/org/repo").json()["sha"]
    r = client.post(
        "/api/models/org/repo/commit/main",
        content=_ndjson(
            {"key": "header", "value": {"summary": "ok", "parentCommit": head}},
            _file("dir/ok.txt", b"hello"),
        ),
    )
    assert r.status_code == 200, r.text
    commit = r.json()["commitOid"]
    for rev in ("main", commit):
        got = client.get(f"/org/repo/resolve/{rev}/dir/ok.txt")
        assert (
            got.content == b"hello"
            and got.headers["X-Repo-Commit"] == commit
            and got.headers["ETag"]
        )
        head_resp = client.head(f"/org/repo/resolve/{rev}/dir/ok.txt")
        assert head_resp.headers["Content-Length"] == "5"
    tree = client.get("/api/models/org/repo/tree/main", params={"recursive": "true"}).json()
    assert {e["path"] for e in tree} == {".gitattributes", "dir", "dir/ok.txt"}
