"""S3-specific behaviour of the S3 store, against a real SeaweedFS (tests/servers/seaweed.py).

Faults are injected through botocore's event hooks: a `before-send` handler that answers in the
server's place, or an `after-call` handler that loses a response the server did send."""

from __future__ import annotations

import os
import subprocess
import sys
import traceback
from concurrent.futures import ThreadPoolExecutor

import pytest
from botocore.awsrequest import AWSResponse
from botocore.exceptions import ConnectionClosedError

from baton.handoff import ABSENT, ConflictError, NotFoundError, Store
from baton.handoff.retry import RetryPolicy
from baton.handoff.errors import StoreConfigError, StoreError, StoreUnavailableError
from baton.handoff.s3 import MULTIPART_THRESHOLD, S3Store, parse_uri

MiB = 1 << 20


@pytest.fixture
def s3(s3_server):
    store = S3Store(s3_server.new_bucket_uri())
    yield store
    store.close()


@pytest.fixture
def fast_retries(monkeypatch):
    monkeypatch.setattr(Store, "retry", RetryPolicy(attempts=3))


class _Body:
    def __init__(self, data: bytes):
        self.data = data

    def stream(self, **_):
        yield self.data


def _answer(status: int, code: str):
    """A response in the server's place, as a fault-injecting proxy would give."""
    body = (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
            f"<Message>injected</Message></Error>").encode()
    return lambda request, **_: AWSResponse(request.url, status, {}, _Body(body))


def _count_sends(store, operation: str, answer=None, times: int = 0) -> list:
    """Record each `operation` request sent; let `answer` reply to the first `times`."""
    sent = []

    def hook(request, **kwargs):
        sent.append(request.method)
        if answer is not None and len(sent) <= times:
            return answer(request, **kwargs)
        return None

    store.client.meta.events.register(f"before-send.s3.{operation}", hook)
    return sent


# -- URIs and configuration -----------------------------------------------------------------

def test_parse_uri():
    assert parse_uri("s3://bucket") == ("bucket", "")
    assert parse_uri("s3://my.bucket-1/runs/a/") == ("my.bucket-1", "runs/a")
    for bad in ["s3://B", "s3://Upper-Case/x", "s3://ok-bucket/../x", "gs://bucket/x"]:
        with pytest.raises(StoreConfigError):
            parse_uri(bad)


def test_endpoint_and_region_come_from_environment(monkeypatch, s3_server):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server.endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    store = S3Store("s3://some-bucket/p")
    assert store.endpoint == s3_server.endpoint  # the S3-specific variable wins
    assert store.client.meta.region_name == "eu-west-3"
    assert store.client.meta.config.s3["addressing_style"] == "path"


def test_prefixes_in_one_bucket_are_separate_stores(s3_server):
    uri = s3_server.new_bucket_uri(prefix="")
    bucket = uri[len("s3://"):]
    a, a2, whole = (S3Store(f"s3://{bucket}/team/a"), S3Store(f"s3://{bucket}/team/a2"),
                    S3Store(f"s3://{bucket}"))
    a.write("run/x.json", b"a")
    a2.write("run/x.json", b"a2")
    assert a.list("") == ["run/x.json"]
    assert a.read("run/x.json").data == b"a"
    assert whole.list("team/") == ["team/a/run/x.json", "team/a2/run/x.json"]
    assert whole.list("team/a") == ["team/a/run/x.json"]  # a folder, never a name prefix


def test_list_walks_every_page(s3):
    keys = [f"run/checkpoints/{i:08d}-g1/manifest.json" for i in range(23)]
    for key in reversed(keys):
        s3.write(key, b"m")
    s3.write("run/HEAD.json", b"h")
    s3.LIST_PAGE_SIZE = 10
    pages = _count_sends(s3, "ListObjectsV2")
    assert s3.list("run/checkpoints/") == keys
    assert len(pages) == 3


def test_environment_reaches_subprocesses(s3):
    """Agents run as subprocesses in the end-to-end tests: they must find the server."""
    s3.write("run/spec.json", b"from the parent")
    code = ("import sys; from baton.handoff import open_store; "
            "sys.stdout.write(open_store(sys.argv[1]).read('run/spec.json').data.decode())")
    out = subprocess.run([sys.executable, "-c", code, s3.uri], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(__file__)), timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "from the parent"


# -- errors a user must fix -----------------------------------------------------------------

def test_missing_bucket_says_so(s3_server, tmp_path):
    store = S3Store("s3://baton-no-such-bucket/runs")
    for attempt in (lambda: store.read("run/HEAD.json"),
                    lambda: store.write("run/HEAD.json", b"x", expect=ABSENT),
                    lambda: store.list("run/"),
                    lambda: store.download("run/a.bin", tmp_path / "a.bin")):
        with pytest.raises(StoreConfigError, match="bucket 'baton-no-such-bucket' does not "
                                                   "exist.*create it or fix the URI"):
            attempt()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("which", ["secret", "key id"])
def test_bad_credentials_say_which_variables_and_hide_the_secret(
        which, s3_server, monkeypatch, caplog):
    bucket_uri = s3_server.new_bucket_uri()
    wrong = "Wr0ngSecretValue-" + os.urandom(6).hex()
    if which == "secret":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    else:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "BATONNOSUCHKEY")
    store = S3Store(bucket_uri)
    sent = _count_sends(store, "PutObject")
    with pytest.raises(StoreConfigError) as info:
        store.write("run/lease.json", b"x", expect=ABSENT)
    text = "".join(traceback.format_exception(info.value))
    assert "AWS_ACCESS_KEY_ID" in str(info.value) and "AWS_SECRET_ACCESS_KEY" in str(info.value)
    for secret in (wrong, s3_server.secret_key):
        assert secret not in text and secret not in caplog.text
    assert len(sent) == 1  # a 403 is not retried


def test_no_credentials_at_all(s3_server, monkeypatch, tmp_path):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE",
                "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    store = S3Store(s3_server.new_bucket_uri())
    with pytest.raises(StoreConfigError, match="AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"):
        store.read("run/HEAD.json")


# -- the conditional write under real concurrency --------------------------------------------

@pytest.mark.parametrize("start", ["absent", "version"])
def test_racing_writers_have_one_winner(s3_server, start):
    """Eight agents on eight clients race for the same lease at once: SeaweedFS must let
    exactly one conditional write through, as AWS S3 does."""
    uri = s3_server.new_bucket_uri()
    stores = [S3Store(uri) for _ in range(8)]
    expect = ABSENT if start == "absent" else stores[0].write("run/lease.json", b"free")

    def take(i: int) -> bool:
        try:
            stores[i].write("run/lease.json", f"holder {i}".encode(), expect=expect)
            return True
        except ConflictError:
            return False

    with ThreadPoolExecutor(8) as pool:
        won = [i for i, ok in enumerate(pool.map(take, range(8))) if ok]
    assert len(won) == 1
    assert stores[0].read("run/lease.json").data == f"holder {won[0]}".encode()


# -- retries: transient faults only ---------------------------------------------------------

def test_lost_condition_is_not_retried(s3):
    s3.write("run/HEAD.json", b"one", expect=ABSENT)
    sent = _count_sends(s3, "PutObject")
    with pytest.raises(ConflictError):
        s3.write("run/HEAD.json", b"two", expect=ABSENT)
    assert len(sent) == 1
    assert s3.read("run/HEAD.json").data == b"one"


@pytest.mark.parametrize("status,code", [(503, "SlowDown"), (500, "InternalError"),
                                         (409, "ConditionalRequestConflict")])
def test_transient_answers_are_retried(s3, fast_retries, status, code):
    sent = _count_sends(s3, "PutObject", _answer(status, code), times=2)
    version = s3.write("run/lease.json", b"mine", expect=ABSENT)
    assert len(sent) == 3
    assert s3.read("run/lease.json").version == version


@pytest.mark.parametrize("status,code,error", [
    (404, "NoSuchKey", ConflictError),  # AWS's answer to If-Match on a deleted object
    (403, "AccessDenied", StoreConfigError),
    (400, "InvalidArgument", StoreError),
])
def test_client_errors_are_answered_at_once(s3, status, code, error):
    version = s3.write("run/HEAD.json", b"h1")
    sent = _count_sends(s3, "PutObject", _answer(status, code), times=99)
    with pytest.raises(error) as info:
        s3.write("run/HEAD.json", b"h2", expect=version)
    assert type(info.value) is error
    assert len(sent) == 1


def test_missing_key_is_not_retried(s3):
    sent = _count_sends(s3, "GetObject")
    with pytest.raises(NotFoundError):
        s3.read("run/none.json")
    assert len(sent) == 1


def test_transient_faults_outlasting_the_retries(s3, fast_retries):
    sent = _count_sends(s3, "GetObject", _answer(503, "SlowDown"), times=99)
    with pytest.raises(StoreUnavailableError, match=s3.endpoint):
        s3.read("run/HEAD.json")
    assert len(sent) == Store.retry.attempts


def test_unreachable_endpoint(monkeypatch, fast_retries):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # discard: nothing listens
    # Credentials of its own: signing needs some, and this test must not lean on the server
    # fixture having put the test server's keys in the environment.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "BATONTESTUNREACHABLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-a-secret")
    store = S3Store("s3://some-bucket/p")
    with pytest.raises(StoreUnavailableError, match=r"127\.0\.0\.1:9 kept failing through 3 "):
        store.read("run/HEAD.json")


@pytest.mark.parametrize("first", [ABSENT, "read"])
def test_retried_write_whose_answer_was_lost(s3, fast_retries, first):
    """The server applied the first attempt but its answer never came; the retry then meets
    its own write, whose condition no longer holds. That write is ours: no conflict."""
    expect = ABSENT if first is ABSENT else s3.write("run/lease.json", b"before")
    lost = []

    def lose_answer(**_):
        if not lost:
            lost.append(True)
            raise ConnectionClosedError(endpoint_url=s3.endpoint)

    s3.client.meta.events.register("after-call.s3.PutObject", lose_answer)
    version = s3.write("run/lease.json", b"gen 2", expect=expect)
    assert lost == [True]
    got = s3.read("run/lease.json")
    assert (got.data, got.version) == (b"gen 2", version)
    with pytest.raises(ConflictError):
        s3.write("run/lease.json", b"gen 3", expect=expect)


# -- files ----------------------------------------------------------------------------------

def test_large_upload_is_multipart_small_is_not(s3, s3_server, tmp_path):
    big, small = tmp_path / "big.bin", tmp_path / "small.bin"
    big.write_bytes(os.urandom(MULTIPART_THRESHOLD + MiB))
    small.write_bytes(os.urandom(MiB))
    parts = _count_sends(s3, "UploadPart")
    s3.upload("run/big.bin", big)
    s3.upload("run/small.bin", small)
    head = lambda key: s3_server.client().head_object(  # noqa: E731
        Bucket=s3.bucket, Key=f"{s3.prefix}/{key}")
    assert len(parts) == 2
    assert head("run/big.bin")["ETag"].strip('"').endswith("-2")
    assert "-" not in head("run/small.bin")["ETag"]
    s3.download("run/big.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == big.read_bytes()


def test_failed_download_keeps_old_file_and_leaves_no_temp(s3, tmp_path):
    dst = tmp_path / "adapter.safetensors"
    dst.write_bytes(b"previous")
    with pytest.raises(NotFoundError):
        s3.download("run/none.safetensors", dst)
    assert dst.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter.safetensors"]


def test_upload_of_missing_local_file(s3, tmp_path):
    with pytest.raises(FileNotFoundError):
        s3.upload("run/x.bin", tmp_path / "absent.bin")
    assert s3.list("run/") == []
