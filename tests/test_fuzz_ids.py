"""Fuzzing model ids through the store templates of every scheme, and the disk tier's names.

Random unicode, separators, percent escapes, dot segments, URL syntax and very long ids: each is
refused with `InvalidModelIdError`, or gives a URL that keeps the template's scheme, host and
fixed parts and whose path, once percent-decoded and normalised, stays under the template's root
(one path segment, or several with ``allow_slash_in_ids``). The disk tier maps any accepted id
(its store allows slashes and 64 Ki characters) to one directory directly under its root.
"""

from __future__ import annotations

import posixpath
import urllib.parse
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from modelcache import InvalidModelIdError
from modelcache._disk import DiskTier
from modelcache._store import Store

TEMPLATES = [
    "s3://bucket/models/{model_id}/",
    "gs://bucket/models/{model_id}/",
    "http://127.0.0.1:8000/models/{model_id}/",
    "https://models.example/root/{model_id}",
    "memory://models/{model_id}",
    "file:///srv/models/{model_id}/",
    "/srv/models/{model_id}",
    "s3://bucket/models/{model_id}.safetensors",
]

_ids = st.one_of(
    st.text(max_size=40),
    st.text(alphabet="aZ0./\\:%~_-+=@?#&;!$'()*, \t\n", max_size=40),
    st.lists(st.sampled_from(["a", "..", ".", "%2e", "%2F", "%00", "/", "\\", "b1", "é"])).map(
        "".join
    ),
    st.integers(190, 70_000).map(lambda n: "a" * n),
)
_EXAMPLES = settings(max_examples=100, deadline=None)


def _root_and_rest(template: str) -> tuple[str, str]:
    before, after = template.split("{model_id}")
    return before, after.rstrip("/")


@pytest.mark.parametrize("allow_slash", [False, True])
@pytest.mark.parametrize("template", TEMPLATES)
@_EXAMPLES
@given(model_id=_ids)
@example(model_id="..")
@example(model_id="a/../../etc")
@example(model_id="%2e%2e")
@example(model_id="a%2F..%2F..")
@example(model_id="http://evil/x")
@example(model_id="a?x=1#f")
@example(model_id="a" * 201)
def test_an_id_is_refused_or_stays_under_the_template_root(
    template: str, allow_slash: bool, model_id: str
) -> None:
    """An id is refused (InvalidModelIdError) or its URL keeps the template's scheme, host and
    suffix and, decoded and normalised, stays below the template's root."""
    store = Store(template, allow_slash_in_ids=allow_slash)
    try:
        url = store.model_url(model_id)
    except InvalidModelIdError:
        return
    root, suffix = _root_and_rest(template)
    assert url.startswith(root) and url.endswith(suffix)
    middle = url[len(root) : len(url) - len(suffix)]
    assert middle == model_id  # nothing added, nothing dropped
    parts = urllib.parse.urlsplit(url)
    template_parts = urllib.parse.urlsplit(template.replace("{model_id}", "x"))
    assert (parts.scheme, parts.netloc) == (template_parts.scheme, template_parts.netloc)
    assert not parts.query and not parts.fragment
    decoded = urllib.parse.unquote(parts.path)
    root_path = urllib.parse.unquote(urllib.parse.urlsplit(root).path).rstrip("/")
    normal = posixpath.normpath(decoded)
    assert normal.startswith(root_path + "/"), (url, normal)
    segments = normal[len(root_path) + 1 :].split("/")
    assert allow_slash or len(segments) == 1
    assert all(s not in ("", ".", "..") for s in segments)


@settings(max_examples=200, deadline=None)
@given(model_id=_ids)
def test_the_disk_tier_maps_any_accepted_id_to_one_directory_under_its_root(model_id: str) -> None:
    """The disk tier's store refuses an id or names one directory directly under its root."""
    root = Path("/srv/disk-tier")
    tier = DiskTier(root, "1MiB")  # never opened: naming touches no disk
    try:
        url = tier.store.model_url(model_id)
    except InvalidModelIdError:
        return
    path = url.removeprefix("file://")
    assert posixpath.dirname(path) == str(root)
    assert posixpath.basename(path) not in ("", ".", "..")
    assert len(posixpath.basename(path).encode()) <= 255  # one name the filesystem takes
