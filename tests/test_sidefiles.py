"""Config and side files: read for every builder, kept with the model in the host and disk tiers."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from modelcache import ModelCache, ModelFormatError, Store, _sidefiles
from modelcache._diskformat import entry_name

if TYPE_CHECKING:  # imported by pytest as a plugin: importing it here first would skip rewriting
    from tests.servers import S3Prefix, SeaweedFS

from .conftest import GatedStore, MemoryModels, check_invariants, model_bytes, settle

pytestmark = pytest.mark.usefixtures("count_threads")

pytest_plugins = ("tests.servers",)

SIDE = {"tokenizer.json": b'{"tok": 1}', "vocab/a.txt": b"alpha", "vocab/b.txt": b"beta!"}


def _add(models: MemoryModels, model_id: str, *, config: Any = None, seed: int = 0) -> None:
    models.add(model_id, 1000, seed=seed, config=config)
    for name, data in SIDE.items():
        models.put(f"{model_id}/{name}", data)


class Seen:
    """A model that records what its builder was given."""

    side_files: tuple[str, ...] = ("tokenizer.json", "vocab/*.txt", "missing.json")

    def __init__(self, config: Any, files: dict[str, bytes], listed: list[str]) -> None:
        self.config, self.files, self.listed = config, files, listed

    @classmethod
    def from_weights(cls, weights: Any, info: Any) -> Seen:
        with info.files_dir() as path:
            listed = sorted(
                os.path.relpath(os.path.join(d, f), path).replace(os.sep, "/")
                for d, _, fs in os.walk(path)
                for f in fs
            )
        return cls(info.config, dict(info.files), listed)


def bind(cache: ModelCache, base: type[Seen] = Seen) -> type[Seen]:
    """A fresh subclass of ``base`` bound to ``cache`` (binding adds ``use`` to the class)."""
    return cache.model(type(base.__name__, (base,), {}))


async def test_every_builder_kind_gets_the_config(models: MemoryModels) -> None:
    """info.config is the parsed config.json for a from_weights class, not only nn.Modules."""
    models.add("m", 100, config={"width": 3})
    cache = ModelCache(models.template, device_budget=1000)

    @cache.model
    class Plain:
        @classmethod
        def from_weights(cls, weights: Any, info: Any) -> Any:
            return info.config

    async with cache, cache.use("m", model=Plain) as config:
        assert config == {"width": 3}


async def test_side_files_and_globs_reach_the_builder(models: MemoryModels) -> None:
    """Declared names and globs come as info.files (absent names left out) and as a directory."""
    _add(models, "m", config={"k": 1})
    models.put("m/other.bin", b"not asked for")
    cache = ModelCache(models.template, device_budget=1000)
    S = bind(cache)
    async with cache, cache.use("m", model=S) as seen:
        assert seen.files == SIDE
        assert seen.config == {"k": 1}
        assert seen.listed == sorted([*SIDE, "config.json"])


def test_side_file_patterns_outside_the_directory_are_refused_when_bound() -> None:
    """A pattern with '..', a leading '/' or a URL cannot be bound."""
    cache = ModelCache("memory://x/{model_id}", device_budget=1000)
    for bad in ("../secret", "/etc/passwd", "s3://b/k", "a/../../b"):

        class Bad(Seen):
            side_files = (bad,)

        with pytest.raises(ValueError, match="inside the model's directory"):
            cache.model(Bad)


async def test_a_side_file_linked_outside_the_model_directory_fails_the_load(
    tmp_path: Path,
) -> None:
    """On a local store a side file that is a symlink out of the model's directory is refused."""
    model = tmp_path / "store" / "m"
    model.mkdir(parents=True)
    (model / "model.safetensors").write_bytes(model_bytes(100))
    (tmp_path / "secret").write_bytes(b"private")
    (model / "tokenizer.json").symlink_to(tmp_path / "secret")
    cache = ModelCache(f"file://{tmp_path}/store/{{model_id}}", device_budget=1000)
    S = bind(cache)
    async with cache:
        with pytest.raises(ModelFormatError, match="leads outside"):
            async with cache.use("m", model=S):
                pass


class SwapsToLink(Store):
    """A local Store whose first stat of ``name`` swaps that file for a symlink to ``target``
    first: the moment after a check made before the reads, before the file is opened."""

    def __init__(self, location: str, name: str, target: Path) -> None:
        super().__init__(location)
        self.name, self.target, self.swapped = name, target, False

    async def size(self, url: str, *, model_id: str) -> int:
        path = self.local_path(url)
        if not self.swapped and path is not None and url.endswith("/" + self.name):
            self.swapped = True
            os.unlink(path)
            os.symlink(self.target, path)
        return await super().size(url, model_id=model_id)


async def test_a_side_file_swapped_for_a_link_out_after_listing_is_never_read(
    tmp_path: Path,
) -> None:
    """Containment holds for the file read: a side file replaced by a symlink out of the model's
    directory after it was listed (and checked) fails the load; its target is never served."""
    model = tmp_path / "store" / "m"
    model.mkdir(parents=True)
    (model / "model.safetensors").write_bytes(model_bytes(100))
    (model / "tokenizer.json").write_bytes(b"inside")
    (tmp_path / "secret").write_bytes(b"private")
    store = SwapsToLink(
        f"file://{tmp_path}/store/{{model_id}}", "tokenizer.json", tmp_path / "secret"
    )
    async with ModelCache(store, device_budget=1000) as cache:
        with pytest.raises(ModelFormatError, match=r"'tokenizer\.json' leads outside"):
            async with cache.use("m", model=bind(cache)) as seen:
                pytest.fail(f"loaded, serving {seen.files}")
    assert store.swapped


async def test_links_inside_the_model_directory_are_read_links_out_are_refused(
    tmp_path: Path,
) -> None:
    """On a local store a side file may be a link (relative or absolute, or under a linked
    directory) to a file inside the model's directory; one through a directory linked out of
    it is refused. What is read is versioned as the file the link reaches."""
    model = tmp_path / "store" / "m"
    (model / "real" / "vocab").mkdir(parents=True)
    (model / "model.safetensors").write_bytes(model_bytes(100))
    (model / "real" / "tok.json").write_bytes(b"tok")
    (model / "real" / "vocab" / "a.txt").write_bytes(b"alpha")
    (model / "tokenizer.json").symlink_to("real/../real/tok.json")
    (tmp_path / "alias").symlink_to(tmp_path / "store")  # the store reached through a link
    (model / "abs.json").symlink_to(tmp_path / "alias" / "m" / "real" / "tok.json")
    (model / "vocab").symlink_to("real/vocab")
    cache = ModelCache(f"file://{tmp_path}/alias/{{model_id}}", device_budget=1000)

    class Linked(Seen):
        side_files = ("tokenizer.json", "abs.json", "vocab/a.txt")

        @classmethod
        def from_weights(cls, weights: Any, info: Any) -> Linked:
            seen = cls(info.config, dict(info.files), [])
            seen.listed = [url for url, _tag in info.version.files]
            return seen

    async with cache, cache.use("m", model=bind(cache, Linked)) as seen:
        assert seen.files == {"tokenizer.json": b"tok", "abs.json": b"tok", "vocab/a.txt": b"alpha"}
        assert any(url.endswith("/m/tokenizer.json") for url in seen.listed)

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "a.txt").write_bytes(b"private")
    (model / "vocab").unlink()
    (model / "vocab").symlink_to(outside)
    cache = ModelCache(f"file://{tmp_path}/store/{{model_id}}", device_budget=1000)
    async with cache:
        with pytest.raises(ModelFormatError, match=r"'vocab/a\.txt' leads outside"):
            async with cache.use("m", model=bind(cache, Linked)):
                pass


async def test_side_files_over_the_size_cap_fail_the_load(
    models: MemoryModels, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A side file over MAX_SIDE_FILE is a ModelFormatError, never truncated."""
    monkeypatch.setattr(_sidefiles, "MAX_SIDE_FILE", 8)
    _add(models, "m")
    cache = ModelCache(models.template, device_budget=1000)
    S = bind(cache)
    async with cache:
        with pytest.raises(ModelFormatError, match="side-file limit"):
            async with cache.use("m", model=S):
                pass


class ReadsRecorded(Store):
    """A Store that records the URLs it reads bytes of."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.read_urls: list[str] = []

    async def read_range(self, url: str, start: int, end: int, *, model_id: str) -> bytes:
        self.read_urls.append(url)
        return await super().read_range(url, start, end, model_id=model_id)


async def test_side_files_over_the_total_cap_fail_before_any_is_read(
    models: MemoryModels, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A glob whose files together exceed MAX_SIDE_FILES fails on their sizes: none of them is
    read into memory first (a glob matching gigabytes would be)."""
    monkeypatch.setattr(_sidefiles, "MAX_SIDE_FILES", 8)
    _add(models, "m")
    store = ReadsRecorded(models.template)
    async with ModelCache(store, device_budget=1000) as cache:
        with pytest.raises(ModelFormatError, match="per model"):
            async with cache.use("m", model=bind(cache)):
                pass
    assert not [url for url in store.read_urls if url.rpartition("/m/")[2] in SIDE]


async def test_host_tier_counts_side_files_and_promotion_reads_none_again(
    models: MemoryModels, gated: GatedStore
) -> None:
    """A model demoted to host memory keeps its side files (counted in the host budget); its
    promotion reads nothing from the store."""
    _add(models, "a", config={"a": 1})
    _add(models, "b", seed=1)
    side = sum(map(len, SIDE.values()))
    cache = ModelCache(gated, device_budget=1000, host_budget=4000)
    S = bind(cache)
    async with cache:
        async with cache.use("a", model=S):
            pass
        async with cache.use("b", model=S):  # evicts a to host memory
            pass
        await settle()
        assert cache.stats().tiers["host"].bytes == 1000 + side
        check_invariants(cache)
        before = sum(gated.calls.values())
        async with cache.use("a", model=S) as seen:
            assert seen.files == SIDE and seen.config == {"a": 1}
        assert sum(gated.calls.values()) == before
        check_invariants(cache)


async def test_disk_entry_serves_config_and_side_files_without_the_store(
    models: MemoryModels, gated: GatedStore, tmp_path: Path
) -> None:
    """A disk-tier hit reads config and side files back from the entry: the store is not read,
    and the entry's budget counts them. (Without revalidation: with it, the next test.)"""
    _add(models, "a", config={"v": 1})
    side = sum(map(len, SIDE.values()))
    async with ModelCache(gated, device_budget=1000, disk_dir=tmp_path, disk_budget="1MiB") as c:
        S = bind(c)
        async with c.use("a", model=S):
            pass
        await settle()
        assert c.stats().tiers["disk"].bytes > 1000 + side
    # The store's side files change: a disk hit must not read them (one version per entry).
    models.put("a/config.json", json.dumps({"v": 2}).encode())
    models.put("a/tokenizer.json", b"{}")
    gated.calls.clear()
    async with ModelCache(
        gated, device_budget=1000, disk_dir=tmp_path, disk_budget="1MiB", revalidate_after=None
    ) as c:
        S = bind(c)
        async with c.use("a", model=S) as seen:
            assert seen.config == {"v": 1} and seen.files == SIDE
        assert c.stats().tiers["disk"].hits == 1
    assert not gated.calls


@pytest.mark.parametrize(
    "name", ["tokenizer.json", "vocab/a.txt", "config.json", _sidefiles.SIDE_MARKER]
)
async def test_a_damaged_side_file_in_a_disk_entry_never_reaches_the_builder(
    models: MemoryModels, tmp_path: Path, name: str
) -> None:
    """Config, side files and marker read back from a disk entry are checked against its
    manifest's checksums: a flipped byte drops the entry and the store's files are served."""
    _add(models, "a", config={"v": 1})
    opts: dict[str, Any] = {"device_budget": 1000, "disk_dir": tmp_path, "disk_budget": "1MiB"}
    async with ModelCache(models.template, **opts) as c:
        async with c.use("a", model=bind(c)):
            pass
        await settle()
    path = tmp_path / entry_name("a") / name
    data = bytearray(path.read_bytes())
    data[-2] ^= 1  # same size, still JSON: only a checksum tells
    path.write_bytes(bytes(data))
    async with ModelCache(models.template, **opts) as c:
        async with c.use("a", model=bind(c)) as seen:
            assert seen.config == {"v": 1} and seen.files == SIDE
        assert c._host_disk.disk is not None and c._host_disk.disk.stats().damaged == 1
        await settle()
        check_invariants(c)
    assert (tmp_path / entry_name("a") / name).read_bytes() != bytes(data)  # written afresh


async def test_a_side_file_changed_in_the_store_is_a_new_version_for_the_disk_tier(
    models: MemoryModels, gated: GatedStore, tmp_path: Path
) -> None:
    """Config and side files are part of a model's version: after a restart, a disk copy whose
    side file changed in the store is not served (revalidation on, the default)."""
    _add(models, "a", config={"v": 1})
    async with ModelCache(gated, device_budget=1000, disk_dir=tmp_path, disk_budget="1MiB") as c:
        S = bind(c)
        async with c.use("a", model=S):
            pass
        await settle()
        assert c.stats().tiers["disk"].entries == 1
    models.put("a/tokenizer.json", b"{}")
    async with ModelCache(gated, device_budget=1000, disk_dir=tmp_path, disk_budget="1MiB") as c:
        S = bind(c)
        async with c.use("a", model=S) as seen:
            assert seen.files["tokenizer.json"] == b"{}" and seen.config == {"v": 1}
        assert c.stats().versions_changed == 1


async def test_a_host_copy_whose_side_files_changed_is_replaced_not_failed_forever(
    models: MemoryModels, tmp_path: Path
) -> None:
    """A host copy read without side files (a prefetch from the disk tier) of a version whose
    side file then changed in the store: a use reads the store afresh (never mixing), instead
    of failing with ModelChangedError on every use while the copy stays."""
    _add(models, "a", config={"v": 1})
    opts: dict[str, Any] = {
        "device_budget": 1000,
        "host_budget": 1000,
        "disk_dir": tmp_path,
        "disk_budget": "1MiB",
        "revalidate_after": None,
    }
    async with ModelCache(models.template, **opts) as c:
        async with c.use("a", model=bind(c)):
            pass
        await settle()
    async with ModelCache(models.template, **opts) as c:
        S = bind(c)
        await c.prefetch(["a"], tier="host")  # from the disk entry: weights only
        models.put("a/tokenizer.json", b"{}")
        for _ in range(2):
            async with c.use("a", model=S) as seen:
                assert seen.files["tokenizer.json"] == b"{}"
        await settle()
        check_invariants(c)


async def test_disk_entry_without_the_side_files_asked_reads_them_from_the_store(
    models: MemoryModels, tmp_path: Path
) -> None:
    """An entry written for a class with no side files does not hide them from one that has."""
    _add(models, "a", config={"v": 1})

    class NoSide(Seen):
        side_files = ()

    async with ModelCache(
        models.template, device_budget=1000, disk_dir=tmp_path, disk_budget="1MiB"
    ) as c:
        no_side = bind(c, NoSide)
        async with c.use("a", model=no_side):
            pass
        await settle()
    async with ModelCache(
        models.template, device_budget=1000, disk_dir=tmp_path, disk_budget="1MiB"
    ) as c:
        S = bind(c)
        async with c.use("a", model=S) as seen:
            assert seen.files == SIDE and seen.config == {"v": 1}
        assert c.stats().tiers["disk"].hits == 1
        # Served, not taken for damage (the weights' check covers the weights' files only).
        assert c._host_disk.disk is not None and c._host_disk.disk.stats().damaged == 0


async def test_side_file_globs_list_a_remote_directory(
    seaweedfs: SeaweedFS, s3_prefix: S3Prefix
) -> None:
    """Over S3 a glob lists the model's prefix and matches names relative to it."""
    s3_prefix.put("m/model.safetensors", model_bytes(100))
    for name, data in SIDE.items():
        s3_prefix.put(f"m/{name}", data)
    s3_prefix.put("m2/vocab/c.txt", b"another model's")  # a sibling prefix: not listed
    cache = ModelCache(
        f"{s3_prefix.url}/{{model_id}}/", storage_options=seaweedfs.s3_options, device_budget=1000
    )
    S = bind(cache)
    async with cache, cache.use("m", model=S) as seen:
        assert seen.files == SIDE


async def test_a_damaged_disk_copy_falls_back_to_the_stores_config_with_its_weights(
    models: MemoryModels, tmp_path: Path
) -> None:
    """When a disk copy's weights fail their checksum and the store is read instead, the config
    and side files come from the store too: never the disk copy's beside the store's weights
    (the store may hold another version by then; unchecked here: revalidation off)."""
    _add(models, "a", config={"v": 1})
    opts: dict[str, Any] = {
        "device_budget": 1000,
        "disk_dir": tmp_path,
        "disk_budget": "1MiB",
        "revalidate_after": None,
    }
    async with ModelCache(models.template, **opts) as c:
        async with c.use("a", model=bind(c)):
            pass
        await settle()
    _add(models, "a", config={"v": 2}, seed=1)  # a new version of the same size
    path = tmp_path / entry_name("a") / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1  # in the weights: only the checksum tells
    path.write_bytes(bytes(data))
    async with ModelCache(models.template, **opts) as c:
        async with c.use("a", model=bind(c)) as seen:
            assert seen.config == {"v": 2} and seen.files == SIDE
        assert c._host_disk.disk is not None and c._host_disk.disk.stats().damaged == 1
        await settle()
        check_invariants(c)
