"""The decode kernel's cache: a library is loaded only when its sha256 is the one this build recorded, and only
from a directory nobody else can write (issue 26)."""

from __future__ import annotations

import logging
import shutil

import pytest

from llamalit.inference.kernels import build_decode_kernel, private_kernel_dir, trusted


@pytest.fixture
def built(tmp_path):
    if not (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")):
        pytest.skip("no C++ compiler")
    return build_decode_kernel(tmp_path / "kernels")


def test_the_cache_dir_is_made_private(tmp_path, built):
    assert built.parent == tmp_path / "kernels" and (built.parent.stat().st_mode & 0o777) == 0o700
    assert trusted(built)


def test_a_tampered_library_is_not_loaded_but_rebuilt(built, caplog):
    good = built.read_bytes()
    built.write_bytes(good[:-64] + b"\0" * 64)  # someone changed the cached library
    assert not trusted(built)
    with caplog.at_level(logging.WARNING, logger="llamalit.inference.kernels"):
        again = build_decode_kernel(built.parent)
    assert again == built and trusted(built) and built.read_bytes()[-64:] != b"\0" * 64
    assert any("does not match the sha256 recorded" in r.getMessage() for r in caplog.records)


def test_a_library_without_its_record_is_not_trusted(built):
    built.with_name(built.name + ".sha256").unlink()
    assert not trusted(built)


@pytest.mark.parametrize("mode", [0o770, 0o707, 0o777])
def test_a_directory_others_can_write_is_not_used(tmp_path, mode, caplog):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(mode)
    with caplog.at_level(logging.WARNING, logger="llamalit.inference.kernels"):
        used = private_kernel_dir(shared)
    assert used != shared and (used.stat().st_mode & 0o777) == 0o700
    (line,) = [r.getMessage() for r in caplog.records]
    assert f"not loading a decode kernel from {shared}: it is writable by others (mode {mode:o})" in line
    assert str(used) in line
    shutil.rmtree(used)
