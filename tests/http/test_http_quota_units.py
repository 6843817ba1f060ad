"""The keys file's name= and limits, and the quota buckets, without a server."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.auth import ApiKeyError, ApiKeys, KeyEntry
from service.quotas import UNNAMED, KeyQuota, Limits, QuotaExceeded


def test_keys_file_format(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(
        "sk-a\n# comment\n  sk-b   name=team-b rpm=5 tpm=100 concurrency=2  \n"
        "sk-c name=team-b rpm=5 tpm=100 concurrency=2\n"
    )
    keys = ApiKeys.from_file(path)
    assert len(keys) == 3 and keys.accepts("sk-a") and keys.accepts("sk-c")
    b = keys.identify("sk-b")
    assert b is not None and b.name == "team-b" and b.limits == Limits(rpm=5, tpm=100, concurrency=2)
    assert keys.quota_for(b) is keys.quota_for(keys.identify("sk-c"))  # one budget per name
    assert keys.quota_for(keys.identify("sk-a")) is keys.quotas.get(UNNAMED)
    for bad, says in [
        ("sk-x colour=red\n", "unknown attribute"),
        ("sk-x rpm=5\n", "need a name"),
        ("sk-x name=a rpm=0\n", "positive integer"),
        ("sk-x name=a rpm\n", "name=value"),
        ("sk-x name=a rpm=1\nsk-y name=a rpm=2\n", "other limits"),
        ("sk-x name=a/b\n", "name must match"),
    ]:
        path.write_text(bad)
        with pytest.raises(ApiKeyError, match=says) as info:
            ApiKeys.from_file(path)
        assert "sk-x" not in str(info.value) and "line" in str(info.value)


def test_reload_keeps_levels_and_in_flight() -> None:
    keys = ApiKeys()
    path_limits = Limits(rpm=2, concurrency=1)
    keys.replace(ApiKeys([KeyEntry(b"sk-1", "t", path_limits)]))
    quota = keys.quotas.get("t")
    quota.admit()
    keys.replace(ApiKeys([KeyEntry(b"sk-2", "t", path_limits)]))  # rotated key, same name
    assert keys.quotas.get("t") is quota and quota.in_flight == 1
    with pytest.raises(QuotaExceeded) as info:
        quota.admit()
    assert info.value.limit == "concurrency"
    quota.release()
    quota.admit()  # the second request of the minute
    quota.release()
    with pytest.raises(QuotaExceeded) as info:
        quota.admit()
    assert info.value.limit == "requests" and 0 < info.value.retry_after_s <= 30


def test_tokens_bucket_refuses_a_charge_once_dry() -> None:
    quota = KeyQuota("t", Limits(tpm=100), None)
    quota.admit()
    quota.admit()  # both admitted while the bucket is above zero
    quota.charge(150)
    with pytest.raises(QuotaExceeded) as info:
        quota.charge(10)  # found dry after tokenisation: refused before batching
    assert info.value.limit == "tokens" and info.value.retry_after_s > 25
