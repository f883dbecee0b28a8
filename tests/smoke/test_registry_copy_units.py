"""The layers `Registry.push_copy` pushes: the original tar read as it is, with the marker file
in front, is a tar of the original's members plus the marker, and what is uploaded is what
its digest and size say."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import pytest
from jobtide_testbed.registry import COPY_MARKER, Blob, marker_member

pytestmark = pytest.mark.unit


def layer(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_a_copied_layer_is_the_original_with_the_marker_in_front(tmp_path: Path) -> None:
    files = {"app/main.py": b"print('hi')\n", "etc/odd-size": b"x" * 1000, "empty": b""}
    original = layer(tmp_path / "layer.tar", files)
    blob = Blob.of(marker_member("run 1"), original)

    with blob.reader() as reader:
        assert len(reader) == blob.size
        # Read in odd pieces, as an upload does: the head's end falls inside one of them.
        pieces = iter(lambda: reader.read(333), b"")
        uploaded = b"".join(pieces)
    assert uploaded == blob.head + original.read_bytes()
    assert blob.size == len(uploaded)
    assert blob.digest == f"sha256:{hashlib.sha256(uploaded).hexdigest()}"

    with tarfile.open(fileobj=io.BytesIO(uploaded)) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
    assert members == {COPY_MARKER: b"run 1", **files}


def test_another_marker_makes_another_layer(tmp_path: Path) -> None:
    original = layer(tmp_path / "layer.tar", {"a": b"a"})
    digests = {Blob.of(marker_member(m), original).digest for m in ("run 1", "run 2")}
    plain = f"sha256:{hashlib.sha256(original.read_bytes()).hexdigest()}"
    assert len(digests - {plain}) == 2


def test_a_blob_without_a_file_is_its_head() -> None:
    blob = Blob.of(b'{"config": 1}')
    with blob.reader() as reader:
        assert reader.read() == b'{"config": 1}'
    assert blob.size == 13
