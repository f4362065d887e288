"""The activation spill file: torch tensors through aligned buffers and the file and back, the
file deleted at close, unaligned calls refused, corrupt or missing bytes caught, OS errors named."""

import errno
import gc
import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

from gmtier import _core
from gmtier._core import SpillError, SpillFile
from gmtier.host_memory import aligned_tensor

PAGE = 4096


def random_floats(buf: torch.Tensor, seed: int) -> torch.Tensor:
    """Fill the uint8 tensor `buf` with random float32s (through a view) and return the view."""
    v = buf.view(torch.float32)
    v.copy_(torch.randn(v.numel(), generator=torch.Generator().manual_seed(seed)))
    return v


def test_tensor_round_trip_through_aligned_buffers(tmp_path):
    src, dst = aligned_tensor(3 * PAGE + 100), aligned_tensor(4 * PAGE)
    assert src.numel() == 4 * PAGE and src.data_ptr() % PAGE == 0 and not dst.any()
    x = random_floats(src, 0)
    with SpillFile(tmp_path / "act.spill", io_threads=2, chunk_bytes=PAGE) as f:  # 4 chunks
        crc = f.write(PAGE, src.data_ptr(), src.numel())
        assert f.read(PAGE, dst.data_ptr(), dst.numel(), expect_crc=crc) == crc
        assert torch.equal(dst.view(torch.float32), x)
        assert (f.bytes_written, f.bytes_read) == (4 * PAGE, 4 * PAGE) and f.write_s > 0 and f.read_s > 0
        assert os.path.getsize(f.path) == 5 * PAGE


def test_threads_move_disjoint_ranges_at_once(tmp_path):
    n, size = 4, 16 * PAGE
    srcs = [aligned_tensor(size) for _ in range(n)]
    for i, s in enumerate(srcs):
        random_floats(s, i)
    crcs = [None] * n
    with SpillFile(tmp_path / "act.spill", chunk_bytes=2 * PAGE) as f:
        def write(i):
            crcs[i] = f.write(i * size, srcs[i].data_ptr(), size)

        threads = [threading.Thread(target=write, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i in reversed(range(n)):
            back = aligned_tensor(size)
            f.read(i * size, back.data_ptr(), size, expect_crc=crcs[i])
            assert torch.equal(back, srcs[i])


def test_close_deletes_the_file_and_is_idempotent(tmp_path):
    buf = aligned_tensor(PAGE)
    f = SpillFile(tmp_path / "act.spill")
    f.write(0, buf.data_ptr(), PAGE)
    assert (tmp_path / "act.spill").exists() and not f.closed
    f.close()
    f.close()
    assert not (tmp_path / "act.spill").exists() and f.closed
    with pytest.raises(ValueError, match="closed; create a new SpillFile"):
        f.read(0, buf.data_ptr(), PAGE)
    g = SpillFile(tmp_path / "other.spill")
    del g
    gc.collect()
    assert not (tmp_path / "other.spill").exists()


def test_unaligned_calls_are_refused(tmp_path):
    buf = aligned_tensor(2 * PAGE)
    with SpillFile(tmp_path / "act.spill") as f:
        with pytest.raises(ValueError, match="offset=512 is not a multiple of 4096"):
            f.write(512, buf.data_ptr(), PAGE)
        with pytest.raises(ValueError, match="nbytes=100 is not a multiple of 4096"):
            f.write(0, buf.data_ptr(), 100)
        with pytest.raises(ValueError, match=f"address={buf.data_ptr() + 8} is not a multiple of 4096"):
            f.read(0, buf.data_ptr() + 8, PAGE)
        assert f.bytes_written == 0
    with pytest.raises(ValueError, match="chunk_bytes=1000 must be a positive multiple of 4096"):
        SpillFile(tmp_path / "x.spill", chunk_bytes=1000)


def test_a_byte_changed_behind_its_back_is_caught(tmp_path):
    src, dst = aligned_tensor(2 * PAGE), aligned_tensor(2 * PAGE)
    random_floats(src, 1)
    path = tmp_path / "act.spill"
    with SpillFile(path) as f:
        crc = f.write(0, src.data_ptr(), 2 * PAGE)
        with open(path, "r+b") as other:
            other.seek(PAGE + 7)
            b = other.read(1)
            other.seek(PAGE + 7)
            other.write(bytes([b[0] ^ 1]))
        with pytest.raises(SpillError, match="torn or corrupt spill"):
            f.read(0, dst.data_ptr(), 2 * PAGE, expect_crc=crc)
        # A range never written is an error too, not zeros.
        with pytest.raises(SpillError, match="runs past its end"):
            f.read(2 * PAGE, dst.data_ptr(), PAGE)


def test_a_full_disk_raises_oserror_naming_file_and_bytes(tmp_path):
    """A write past a file-size limit (RLIMIT_FSIZE, as a full disk would) is an OSError with the
    file, the bytes and the fix."""
    code = textwrap.dedent(f"""
        import resource, signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        from gmtier import _core
        buf = _core.AlignedBuffer({4 * PAGE})
        f = _core.SpillFile({str(tmp_path / "act.spill")!r})
        resource.setrlimit(resource.RLIMIT_FSIZE, ({2 * PAGE}, {2 * PAGE}))
        try:
            f.write(0, buf.address, buf.nbytes)
        except OSError as e:
            print("ERR", e.errno, e)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert f"ERR {errno.EFBIG}" in out.stdout, out
    assert f"spill write of {4 * PAGE} bytes at offset 0 to {tmp_path / 'act.spill'}" in out.stdout, out
    assert "file size limit" in out.stdout, out


def test_views_keep_their_buffer_alive():
    t = aligned_tensor(PAGE)
    gc.collect()
    t.fill_(3)  # freed memory would fault here
    assert int(t.sum()) == 3 * PAGE
    with pytest.raises(MemoryError, match="could not map"):
        _core.AlignedBuffer(1 << 62)
