"""The object-store mirror (service/storage.py) against a real S3 API server (moto's, on
127.0.0.1): what reaches the local folder, and when."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from buckets import S3, Bucket, free_port

from service.metrics import Metrics
from service.repository import scan
from service.settings import Settings
from service.storage import Mirror


@pytest.fixture(scope="module")
def s3() -> Iterator[S3]:
    server = S3()
    yield server
    server.stop()


@pytest.fixture
def bucket(s3: S3, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Bucket:
    for name, value in s3.env.items():
        monkeypatch.setenv(name, value)
    return s3.bucket(request.node.name.replace("_", "-")[:60].strip("-"))


@pytest.fixture
async def mirror(bucket: Bucket) -> AsyncIterator[Mirror]:
    m = Mirror(f"s3://{bucket.name}/models", Metrics())
    yield m
    await m.close()
    assert not m.folder.exists()


def files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


async def test_a_version_is_downloaded_whole_once_it_settled(bucket: Bucket,
                                                             mirror: Mirror) -> None:
    bucket.put("models/m/config.yaml", b"version_policy: all\n")
    bucket.put("models/m/1/model.keras", b"one")
    bucket.put("models/m/1/variables/data", b"weights")
    assert await mirror.refresh(quiet=60)
    # config.yaml is one object, replaced atomically: it applies at once; the version
    # waits until its listing has stayed the same for the quiet interval.
    assert files(mirror.folder) == {"m/config.yaml": b"version_policy: all\n"}
    assert await mirror.refresh(quiet=60)
    assert "m/1/model.keras" not in files(mirror.folder)
    assert await mirror.refresh(quiet=0)
    assert files(mirror.folder) == {"m/config.yaml": b"version_policy: all\n",
                                    "m/1/model.keras": b"one", "m/1/variables/data": b"weights"}

    # A changed version is replaced whole, once settled; until then the old one stays.
    bucket.put("models/m/1/model.keras", b"one, again")
    assert await mirror.refresh(quiet=60)
    assert files(mirror.folder)["m/1/model.keras"] == b"one"
    assert await mirror.refresh(quiet=0)
    assert files(mirror.folder)["m/1/model.keras"] == b"one, again"
    # The registry's stamp of the folder changes with any change, a same-sized one too.
    stamp = scan(mirror.folder, "m").versions[1].stamp
    bucket.put("models/m/1/model.keras", b"ONE, AGAIN")
    assert await mirror.refresh(quiet=0)
    assert files(mirror.folder)["m/1/model.keras"] == b"ONE, AGAIN"
    assert scan(mirror.folder, "m").versions[1].stamp != stamp
    # Nothing is left behind in the staging folder (hidden: the registry skips it).
    assert not any((mirror.folder / ".incoming").iterdir())


async def test_what_leaves_the_bucket_leaves_the_mirror(bucket: Bucket, mirror: Mirror) -> None:
    bucket.put("models/m/1/model.keras", b"one")
    bucket.put("models/m/2/model.keras", b"two")
    bucket.put("models/other/1/model.h5", b"h5")
    assert await mirror.refresh(quiet=0)
    assert set(files(mirror.folder)) == {"m/1/model.keras", "m/2/model.keras",
                                         "other/1/model.h5"}
    bucket.delete("models/m/2")
    bucket.delete("models/other")
    assert await mirror.refresh(quiet=0)
    assert set(files(mirror.folder)) == {"m/1/model.keras"}
    assert sorted(p.name for p in mirror.folder.iterdir() if not p.name.startswith(".")) == ["m"]


async def test_keys_that_are_not_repository_paths_are_skipped(bucket: Bucket,
                                                             mirror: Mirror) -> None:
    bucket.put("models/m/1/model.keras", b"one")
    bucket.put("models/README.txt", b"root-level file")
    bucket.put("models/.hidden/1/model.keras", b"hidden")
    bucket.put("models/m/1/.partial/x", b"hidden")
    bucket.put("models/m/notes/deep.txt", b"neither a version nor a model file")
    assert await mirror.refresh(quiet=0)
    assert set(files(mirror.folder)) == {"m/1/model.keras"}


async def test_an_unreachable_bucket_fails_a_refresh_and_is_logged_once(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-to-be-logged")
    metrics = Metrics()
    mirror = Mirror("s3://nowhere/models", metrics)
    try:
        with caplog.at_level(logging.INFO, logger="service.storage"):
            assert not await mirror.refresh(quiet=0)
            assert not await mirror.refresh(quiet=0)
    finally:
        await mirror.close()
    labels = {"repository": "s3://nowhere/models"}
    assert metrics.registry.get_sample_value("tapserve_repository_reachable", labels) == 0
    assert metrics.registry.get_sample_value("tapserve_repository_read_failures_total",
                                             labels) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "cannot list s3://nowhere/models" in errors[0], errors
    assert "not-to-be-logged" not in caplog.text
    assert not mirror.folder.exists()


@pytest.mark.parametrize("url", ["s3://bucket/prefix", "gs://bucket", "s3://bucket"])
def test_settings_keep_a_repository_url(url: str) -> None:
    assert Settings(model_repository=url).model_repository == url


@pytest.mark.parametrize("url", ["az://bucket/prefix", "s3://", "s3://KEY:SECRET@bucket/x"])
def test_settings_refuse_other_urls_without_echoing_them(url: str) -> None:
    with pytest.raises(ValueError) as error:
        Settings(model_repository=url)
    assert "s3://bucket/prefix or gs://bucket/prefix" in str(error.value) or (
        "not a valid bucket name" in str(error.value))
    assert "SECRET" not in str(error.value)
