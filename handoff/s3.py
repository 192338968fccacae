"""A store in an S3 bucket: AWS, or any S3-compatible endpoint named by AWS_ENDPOINT_URL.

The conditional write is `PutObject` with `If-None-Match: *` (create only) or
`If-Match: <etag>` (replace only that version); the version token is the object's ETag. A 412
means the condition lost; a 409 ConditionalRequestConflict (a racing conditional write was in
flight) is retried. boto3's own retries are off so that `handoff.retry` is the one policy, and it
retries transient faults only: a 412, 403 or 404 answers at once.

Files go through boto3's transfer manager (multipart above MULTIPART_THRESHOLD, parts uploaded
in parallel); downloads land under a temporary name and are renamed into place, so a failed one
leaves nothing behind.
"""

from __future__ import annotations

import functools
import os
import re
import tempfile
from contextlib import closing
from pathlib import Path
from typing import Any, Callable, Optional

import boto3
import botocore
import botocore.session
from boto3.exceptions import Boto3Error, RetriesExceededError, S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from .retry import RETRYABLE_STATUS, RetryPolicy
from .errors import (
    ConflictError,
    NotFoundError,
    StoreConfigError,
    StoreError,
    StoreUnavailableError,
)
from .store import ABSENT, Expect, Store, Versioned, check_key

DEFAULT_REGION = "us-east-1"
MiB = 1 << 20
MULTIPART_THRESHOLD = 16 * MiB
# num_download_attempts=1: s3transfer's own retries would multiply ours (handoff.retry).
TRANSFER = TransferConfig(
    multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=16 * MiB, max_concurrency=4,
    num_download_attempts=1)
# A free-tier notebook's network is slow, not dead: a part of 16 MiB must fit in READ_TIMEOUT.
CONNECT_TIMEOUT, READ_TIMEOUT = 10, 120
BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
TRANSIENT_CODES = frozenset({
    "SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable", "Throttling",
    "ThrottlingException", "ConditionalRequestConflict", "OperationAborted",
})
CREDENTIAL_CODES = frozenset({
    "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken",
    "ExpiredToken", "TokenRefreshRequired", "InvalidSecurity", "AllAccessDisabled",
})
CREDENTIALS_HINT = ("check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN "
                    "for temporary keys), and that they may read and write this bucket")


def parse_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` -> ('bucket', 'some/prefix'); the prefix may be empty."""
    if not uri.startswith("s3://"):
        raise StoreConfigError(f"{uri!r} is not an S3 URI; write s3://bucket/prefix")
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    if not BUCKET.match(bucket):
        raise StoreConfigError(
            f"{bucket!r} in {uri!r} is not a valid bucket name: use 3-63 lowercase letters, "
            "digits, '.' and '-'")
    prefix = prefix.strip("/")
    if prefix:
        try:
            check_key(prefix)
        except ValueError as exc:
            raise StoreConfigError(f"bad prefix in {uri!r}: {exc}") from None
    return bucket, prefix


def _unwrap(exc: BaseException) -> BaseException:
    """The client error inside boto3's transfer wrappers, which keep it only as context."""
    if isinstance(exc, RetriesExceededError) and exc.last_exception is not None:
        return exc.last_exception
    if isinstance(exc, S3UploadFailedError):
        return exc.__cause__ or exc.__context__ or exc
    return exc


def _status(exc: BaseException) -> Optional[int]:
    if isinstance(exc, ClientError):
        return exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return None


def _code(exc: BaseException) -> str:
    return exc.response.get("Error", {}).get("Code", "") if isinstance(exc, ClientError) else ""


def is_transient(exc: BaseException) -> bool:
    """Faults that another attempt may not meet: the network, timeouts, 5xx, throttling, 409."""
    exc = _unwrap(exc)
    if isinstance(exc, (BotoConnectionError, HTTPClientError, IncompleteReadError,
                        ConnectionError, TimeoutError)):
        return True
    return isinstance(exc, ClientError) and (
        _status(exc) in RETRYABLE_STATUS or _code(exc) in TRANSIENT_CODES)


def _condition(expect: Expect) -> dict[str, str]:
    if expect is None:
        return {}
    if expect is ABSENT:
        return {"IfNoneMatch": "*"}
    return {"IfMatch": str(expect)}


def _endpoint_from_env() -> Optional[str]:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


@functools.lru_cache(maxsize=1)
def _shared_loader():
    """botocore's loader of service models, shared by every store: parsing the S3 model
    costs about 0.2 s a client, while credentials must still be read afresh per session."""
    return botocore.session.get_session().get_component("data_loader")


def _session() -> boto3.session.Session:
    # A session per store: boto3 sessions are not thread-safe, its clients are.
    core = botocore.session.Session()
    core.register_component("data_loader", _shared_loader())
    return boto3.session.Session(botocore_session=core)


def _make_client(session: boto3.session.Session, endpoint: Optional[str], region: str):
    # total_max_attempts counts the first try (max_attempts counts retries only): exactly one
    # request per attempt of ours.
    options: dict[str, Any] = dict(
        region_name=region, connect_timeout=CONNECT_TIMEOUT, read_timeout=READ_TIMEOUT,
        retries={"total_max_attempts": 1, "mode": "standard"}, max_pool_connections=16)
    if endpoint:
        # Self-hosted endpoints (MinIO, SeaweedFS, R2) rarely have per-bucket DNS names.
        options["s3"] = {"addressing_style": "path"}
    return session.client("s3", endpoint_url=endpoint, config=Config(**options))


def _require_conditional_writes(client) -> None:
    members = client.meta.service_model.operation_model("PutObject").input_shape.members
    if "IfMatch" not in members or "IfNoneMatch" not in members:
        raise StoreConfigError(
            f"botocore {botocore.__version__} cannot send conditional writes (If-Match / "
            "If-None-Match on PutObject), which the S3 store needs for its lease; upgrade it "
            "with `pip install -U boto3`")


class S3Store(Store):
    LIST_PAGE_SIZE = 1000  # S3's maximum; tests lower it to walk several pages

    def __init__(self, uri: str, *, retry: Optional[RetryPolicy] = None):
        self.uri = uri
        if retry is not None:
            self.retry = retry
        self.bucket, self.prefix = parse_uri(uri)
        self.endpoint = _endpoint_from_env()
        session = _session()
        # AWS_DEFAULT_REGION and ~/.aws/config reach us through the session.
        self.region = os.environ.get("AWS_REGION") or session.region_name or DEFAULT_REGION
        self.client = _make_client(session, self.endpoint, self.region)
        _require_conditional_writes(self.client)

    # -- keys and errors -----------------------------------------------------------------

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    @property
    def _root(self) -> str:
        return f"{self.prefix}/" if self.prefix else ""

    @property
    def _where(self) -> str:
        return self.endpoint or f"AWS S3 ({self.region})"

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """One S3 operation under the retry policy; failures become StoreErrors."""
        try:
            return self.retry.retrying(is_transient)(fn, *args, **kwargs)
        except (BotoCoreError, ClientError, Boto3Error, ConnectionError, TimeoutError) as exc:
            error = self._translate(_unwrap(exc), what)
            # Credential failures drop the chain: nothing of the signed request leaks on.
            cause = None if isinstance(error, StoreConfigError) else exc
            raise error from cause

    def _translate(self, exc: BaseException, what: str) -> StoreError:
        code, status = _code(exc), _status(exc)
        if status == 412 or code == "PreconditionFailed":
            return ConflictError(f"{what}: the object changed or already exists (412)")
        if code == "NoSuchBucket" or (status == 404 and code != "NoSuchKey"
                                      and self._bucket_missing()):
            return StoreConfigError(
                f"bucket {self.bucket!r} does not exist at {self._where}; create it or fix the "
                f"URI {self.uri!r}")
        if code == "NoSuchKey" or status == 404:
            return NotFoundError(f"{what}: not found in {self.uri}")
        if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
            return StoreConfigError(f"{what}: no usable AWS credentials found; set "
                                    "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
        if status == 403 or code in CREDENTIAL_CODES:
            return StoreConfigError(f"{what}: {self._where} refused the credentials "
                                    f"({code or status}); {CREDENTIALS_HINT}")
        if is_transient(exc):
            return StoreUnavailableError(
                f"{what}: {self._where} kept failing through {self.retry.describe()} "
                f"({type(exc).__name__}: {str(exc)[:200]}); "
                "check the network, or "
                "AWS_ENDPOINT_URL if you set one")
        return StoreError(f"{what}: S3 at {self._where} failed: {type(exc).__name__}: "
                          f"{str(exc)[:300]}")

    def _bucket_missing(self) -> bool:
        """A HEAD's 404 has no body to say whether the key or the bucket is missing."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
            return False
        except ClientError as exc:
            return _status(exc) == 404
        except BotoCoreError:
            return False

    # -- the Store interface -------------------------------------------------------------

    def read(self, key: str) -> Versioned:
        def get() -> Versioned:
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            with closing(response["Body"]) as body:
                return Versioned(body.read(), response["ETag"])

        return self._call(f"reading {key}", get)

    def write(self, key: str, data: bytes, *, expect: Expect = None) -> str:
        request = dict(Bucket=self.bucket, Key=self._key(key), Body=data, **_condition(expect))
        attempts = 0

        def put() -> str:
            nonlocal attempts
            attempts += 1
            return self.client.put_object(**request)["ETag"]

        try:
            return self._call(f"writing {key}", put)
        except NotFoundError as exc:
            # AWS answers If-Match on a missing object with 404, SeaweedFS with 412.
            raise ConflictError(f"writing {key}: it no longer exists") from exc
        except ConflictError:
            echo = self._own_echo(key, data) if attempts > 1 else None
            if echo is None:
                raise
            return echo

    def _own_echo(self, key: str, data: bytes) -> Optional[str]:
        """After a retried conditional write lost its condition: did an earlier attempt, whose
        answer never arrived, already store exactly these bytes? Then that write was ours."""
        current = self.read_optional(key)
        return current.version if current is not None and current.data == data else None

    def upload(self, key: str, path: Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"cannot upload {path}: no such file")
        self._call(f"uploading {path.name} to {key}", self.client.upload_file,
                   str(path), self.bucket, self._key(key), Config=TRANSFER)

    def download(self, key: str, path: Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
        os.close(fd)
        try:
            self._call(f"downloading {key}", self.client.download_file,
                       self.bucket, self._key(key), tmp, Config=TRANSFER)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def list(self, prefix: str) -> list[str]:
        # A prefix names a folder, as in the local store: 'run/a' never matches 'run/ab/x'.
        if prefix:
            check_key(prefix.rstrip("/"))
            prefix = prefix.rstrip("/") + "/"
        root = self._root

        def collect() -> list[str]:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=root + prefix,
                PaginationConfig={"PageSize": self.LIST_PAGE_SIZE})
            return sorted(obj["Key"][len(root):] for page in pages
                          for obj in page.get("Contents", []))

        return self._call(f"listing {prefix or '/'}", collect)

    def delete(self, key: str) -> None:
        try:
            self._call(f"deleting {key}", self.client.delete_object,
                       Bucket=self.bucket, Key=self._key(key))
        except NotFoundError:
            pass

    def close(self) -> None:
        self.client.close()
