"""The Hub backend beyond the shared conformance suite: one commit per checkpoint, per-key
conditions while other files move, 412 races, lost responses, faults, and errors that never
carry the token. Everything runs against the local Hub double (tests/servers/hub_double.py)
through the real huggingface_hub client; one live test talks to the real Hub when asked to."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
import traceback
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from baton.handoff import ABSENT, ConflictError, NotFoundError, StoreConfigError, StoreUnavailableError
from baton.handoff.retry import RetryPolicy
from baton.handoff.store import Store
from baton.handoff.hub import HubStore
from tests.servers import hub_double

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def hub(hub_server):
    store = HubStore(hub_server.new_repo_uri())
    yield store
    store.close()


@pytest.fixture
def fast_retries(monkeypatch):
    """Three attempts, no waiting: the policy's backoff is not what these tests check."""
    monkeypatch.setattr(Store, "retry", RetryPolicy(attempts=3, max_wait=0))


def _checkpoint(tmp_path: Path) -> dict[str, Path]:
    files = {}
    for name, data in [("adapter_model.safetensors", os.urandom(50_000)),
                       ("adapter_config.json", b'{"r": 16}'), ("manifest.json", b'{"files": {}}')]:
        (tmp_path / name).write_bytes(data)
        files[f"run/checkpoints/00000010-g1/{name}"] = tmp_path / name
    return files


def test_publish_is_one_commit(hub, hub_server, tmp_path):
    hub.write("run/HEAD.json", b"h0", expect=ABSENT)
    before = hub_server.commits(hub.repo_id)
    files = _checkpoint(tmp_path)
    version = hub.publish(files, "run/HEAD.json", b"h1", expect=hub.read("run/HEAD.json").version)
    assert hub_server.commits(hub.repo_id) == before + 1
    stored = hub_server.files(hub.repo_id)
    assert stored["run/HEAD.json"] == b"h1"
    for key, path in files.items():
        assert stored[key] == path.read_bytes()
    assert hub_server.is_lfs(hub.repo_id, "run/checkpoints/00000010-g1/adapter_model.safetensors")
    assert hub.read("run/HEAD.json").version == version


def test_lost_publish_race_lands_nothing(hub, hub_server, tmp_path):
    """The checkpoint and HEAD go together: when HEAD moved, none of the files appear."""
    version = hub.write("run/HEAD.json", b"h0", expect=ABSENT)
    hub_server.inject_before_next_commit(hub.repo_id, {"run/HEAD.json": b"successor"})
    with pytest.raises(ConflictError):
        hub.publish(_checkpoint(tmp_path), "run/HEAD.json", b"h1", expect=version)
    assert hub.list("run/checkpoints/") == []
    assert hub.read("run/HEAD.json").data == b"successor"


def test_condition_holds_across_an_unrelated_412(hub, hub_server):
    """Another file lands between our read of the head and our commit: the Hub answers 412,
    the key is unchanged, so the write goes through on the new head."""
    version = hub.write("run/lease.json", b"mine-1", expect=ABSENT)
    before = hub_server.commits(hub.repo_id)
    hub_server.inject_before_next_commit(hub.repo_id, {"run/sessions/s2.json": b"record"})
    new = hub.write("run/lease.json", b"mine-2", expect=version)
    assert hub_server.commits(hub.repo_id) == before + 2  # the intruder's and ours
    assert hub.read("run/lease.json") .data == b"mine-2"
    assert hub.read("run/lease.json").version == new
    assert hub.read("run/sessions/s2.json").data == b"record"


def test_same_key_race_conflicts(hub, hub_server):
    version = hub.write("run/lease.json", b"mine", expect=ABSENT)
    hub_server.inject_before_next_commit(hub.repo_id, {"run/lease.json": b"theirs"})
    with pytest.raises(ConflictError):
        hub.write("run/lease.json", b"mine-again", expect=version)
    assert hub.read("run/lease.json").data == b"theirs"


def test_absent_race_conflicts(hub, hub_server):
    hub.write("run/other.json", b"x")  # the repo exists
    hub_server.inject_before_next_commit(hub.repo_id, {"run/spec.json": b"theirs"})
    with pytest.raises(ConflictError):
        hub.write("run/spec.json", b"mine", expect=ABSENT)
    assert hub.read("run/spec.json").data == b"theirs"


def test_lost_commit_response_is_not_a_conflict(hub, hub_server, fast_retries):
    """The commit landed but its answer was lost (a 502 in flight): the retry finds our own
    bytes at the key and reports success instead of a conflict, without a second commit."""
    version = hub.write("run/HEAD.json", b"h0", expect=ABSENT)
    before = hub_server.commits(hub.repo_id)
    hub_server.fail_next(f"POST /api/models/{hub.repo_id}/commit/", 502, after=True)
    hub.write("run/HEAD.json", b"h1", expect=version)
    assert not hub_server.state.faults  # the fault fired
    assert hub_server.commits(hub.repo_id) == before + 1
    assert hub.read("run/HEAD.json").data == b"h1"


def test_transient_faults_are_retried(hub, hub_server, fast_retries, tmp_path):
    hub.write("run/a.json", b"a")
    hub_server.fail_next(f"GET /{hub.repo_id}/resolve/", 429)
    assert hub.read("run/a.json").data == b"a"
    hub_server.fail_next(f"GET /api/models/{hub.repo_id}/revision/main", 503, times=2)
    hub.write("run/a.json", b"b", expect=hub.read("run/a.json").version)
    assert hub.read("run/a.json").data == b"b"
    hub_server.fail_next(f"HEAD /{hub.repo_id}/resolve/", 502)
    hub.download("run/a.json", tmp_path / "a.json")
    assert (tmp_path / "a.json").read_bytes() == b"b"
    assert not hub_server.state.faults  # every injected fault was met and ridden out


def test_faults_that_outlast_retries_name_the_endpoint(hub, hub_server, fast_retries):
    hub.write("run/a.json", b"a")
    hub_server.fail_next(f"GET /api/models/{hub.repo_id}/revision/main", 503, times=3)
    with pytest.raises(StoreUnavailableError, match=hub_server.endpoint):
        hub.write("run/a.json", b"b", expect=ABSENT)
    hub_server.fail_next(f"POST /api/models/{hub.repo_id}/commit/", 404)  # not transient
    with pytest.raises(Exception) as info:
        hub.write("run/a.json", b"c")
    assert not isinstance(info.value, StoreUnavailableError)


def _all_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


def test_bad_token_names_hf_token_without_its_value(hub_server, monkeypatch):
    secret = "hf_" + uuid.uuid4().hex + "SECRET"
    monkeypatch.setenv("HF_TOKEN", secret)
    store = HubStore(hub_server.new_repo_uri())
    for call in (lambda: store.write("run/x.json", b"x"), lambda: store.read("run/x.json")):
        with pytest.raises(StoreConfigError) as info:
            call()
        assert "HF_TOKEN" in str(info.value)
        assert secret not in _all_text(info.value)


def test_offline_mode_is_a_config_error_at_once(hub, monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(StoreConfigError, match="HF_HUB_OFFLINE"):
        hub.write("run/x.json", b"x")


def test_other_namespace_is_a_config_error(hub_server):
    store = HubStore("hf://someone-else/their-repo")
    assert store.read_optional("run/x.json") is None  # invisible, so empty
    with pytest.raises(StoreConfigError, match="someone-else"):
        store.write("run/x.json", b"x", expect=ABSENT)


def test_missing_repo_reads_as_empty_and_is_not_created(hub, hub_server, tmp_path):
    with pytest.raises(NotFoundError):
        hub.read("run/HEAD.json")
    with pytest.raises(NotFoundError):
        hub.download("run/a.bin", tmp_path / "a.bin")
    assert hub.list("run/") == []
    hub.delete("run/HEAD.json")
    hub.delete_prefix("run/checkpoints/c1/")
    with pytest.raises(ConflictError):
        hub.write("run/HEAD.json", b"x", expect="0" * 64)
    assert hub.repo_id not in hub_server.state.repos
    hub.write("run/HEAD.json", b"x", expect=ABSENT)
    assert hub_server.state.repos[hub.repo_id].private


def test_delete_prefix_is_one_commit(hub, hub_server, tmp_path):
    hub.publish(_checkpoint(tmp_path), "run/HEAD.json", b"h", expect=ABSENT)
    hub.write("run/checkpoints/00000020-g1/manifest.json", b"{}")
    before = hub_server.commits(hub.repo_id)
    hub.delete_prefix("run/checkpoints/00000010-g1/")
    assert hub_server.commits(hub.repo_id) == before + 1
    assert hub.list("run/checkpoints/") == ["run/checkpoints/00000020-g1/manifest.json"]
    hub.delete_prefix("run/checkpoints/00000010-g1/")  # already gone: no error, no commit
    assert hub_server.commits(hub.repo_id) == before + 1


def test_sub_prefix_scopes_keys(hub_server):
    uri = hub_server.new_repo_uri()
    store = HubStore(uri + "/runs/team-a")
    store.write("run/HEAD.json", b"h", expect=ABSENT)
    HubStore(uri).write("elsewhere.json", b"e")
    assert store.list("") == ["run/HEAD.json"]
    assert "runs/team-a/run/HEAD.json" in hub_server.files(store.repo_id)


def test_list_follows_pages(hub, monkeypatch):
    monkeypatch.setattr(hub_double, "PAGE_SIZE", 2)
    keys = [f"run/sessions/s{i}.json" for i in range(5)]
    hub.publish({}, "run/HEAD.json", b"h", expect=ABSENT)
    for key in keys:
        hub.write(key, b"{}")
    assert hub.list("run/sessions/") == keys


def test_download_leaves_only_the_file(hub, tmp_path):
    data = os.urandom(20_000)
    (tmp_path / "src.bin").write_bytes(data)
    hub.upload("run/w.bin", tmp_path / "src.bin")
    out = tmp_path / "out"
    hub.download("run/w.bin", out / "w.bin")
    assert (out / "w.bin").read_bytes() == data
    assert [p.name for p in out.iterdir()] == ["w.bin"]  # no cache or temp left behind


@pytest.mark.parametrize("uri", ["hf://only-namespace", "hf://a/b c", "hf://a/b/../c"])
def test_bad_uri_is_a_config_error(uri):
    with pytest.raises((StoreConfigError, ValueError)):
        HubStore(uri)


RACER = """
import sys
from baton.handoff import ABSENT, ConflictError, open_store
store = open_store(sys.argv[1])
try:
    store.write("run/lease.json", sys.argv[2].encode(), expect=ABSENT)
    print("won")
except ConflictError:
    print("lost")
"""


def test_processes_racing_for_one_key_have_one_winner(hub_server):
    """Separate processes, as separate agents would be, see one truth through the double."""
    uri = hub_server.new_repo_uri()
    HubStore(uri).write("run/spec.json", b"s")
    procs = [subprocess.Popen([sys.executable, "-c", RACER, uri, f"agent-{i}"], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True) for i in range(3)]
    results = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert sorted(results) == ["lost", "lost", "won"]
    winner = f"agent-{results.index('won')}".encode()
    assert HubStore(uri).read("run/lease.json").data == winner


# The shell's own settings, read at collection: the Hub double's fixture replaces HF_TOKEN and
# HF_ENDPOINT in os.environ for the rest of the session once any test has started it.
LIVE_ENV = {k: os.environ.get(k) for k in ("HF_TOKEN", "HF_ENDPOINT")}


def _live_hub_configured(monkeypatch) -> str:
    endpoint = LIVE_ENV["HF_ENDPOINT"] or "https://huggingface.co"
    host = urlsplit(endpoint).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not LIVE_ENV["HF_TOKEN"] or loopback:
        pytest.skip("live Hub test: set HF_TOKEN (and a non-loopback HF_ENDPOINT, if any)")
    repo = os.environ.get("BATON_LIVE_HUB_REPO")
    if not repo:
        pytest.skip("live Hub test: set BATON_LIVE_HUB_REPO=namespace/private-repo")
    monkeypatch.setenv("HF_TOKEN", LIVE_ENV["HF_TOKEN"])
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    return repo


@pytest.mark.live_hub
def test_live_hub_round_trip(monkeypatch):
    """A small round trip and a conditional write on a real private repo; cleans up after.
    Run it with `HF_TOKEN=... BATON_LIVE_HUB_REPO=me/scratch pytest -m live_hub`."""
    repo = _live_hub_configured(monkeypatch)
    folder = f"baton-live-test/{uuid.uuid4().hex[:12]}"
    store = HubStore(f"hf://{repo}/{folder}")
    try:
        v1 = store.write("run/HEAD.json", b'{"step": 1}', expect=ABSENT)
        with pytest.raises(ConflictError):
            store.write("run/HEAD.json", b'{"step": 0}', expect=ABSENT)
        v2 = store.write("run/HEAD.json", b'{"step": 2}', expect=v1)
        with pytest.raises(ConflictError):
            store.write("run/HEAD.json", b'{"step": 3}', expect=v1)
        got = store.read("run/HEAD.json")
        assert (got.data, got.version) == (b'{"step": 2}', v2)
        assert store.list("run/") == ["run/HEAD.json"]
    finally:
        HubStore(f"hf://{repo}").delete_prefix(folder + "/")
    assert store.list("run/") == []
