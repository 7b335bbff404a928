"""recording.py's rules, without a GPU: which array a recorded pointer belongs to (an exact base address
first, else the one extent holding it; never a guess), what makes a recording unusable, and that the
launch record keeps the relocations a replay needs."""

import struct
from types import SimpleNamespace

import pytest

from cuflash import recording


def _rec():
    # q at 0x1000 (256 bytes), a cache at 0x8000 (4 KB), an absent array, a second view into the cache
    return recording.Recording([(0x1000, 256), (0x8000, 4096), None, (0x8400, 1024)])


def test_exact_base_wins_over_an_enclosing_extent():
    rec = _rec()
    assert rec.locate(0x8400) == (3, 0)  # inside the cache's extent too, but it starts the view
    assert rec.locate(0x8000) == (1, 0)
    assert rec.locate(0x1010) == (0, 0x10)


def test_ambiguous_or_unknown_addresses_are_unbindable():
    rec = _rec()
    with pytest.raises(recording.Unbindable):
        rec.locate(0x8500)  # in the cache and in the view
    with pytest.raises(recording.Unbindable):
        rec.locate(0x1100)  # one past q's end: no array's memory
    with pytest.raises(recording.Unbindable):
        recording.Recording([(0x1000, 16), (0x1000, 32)]).locate(0x1000)


def test_allocations_become_regions_after_the_inputs():
    rec = _rec()
    rec.allocated(SimpleNamespace(ptr=0x20000, shape=(4, 8), dtype="float32"), object(), 128)
    assert rec.locate(0x20040) == (4, 0x40)
    assert rec.allocs == [((4, 8), "float32")]


def test_launch_records_pointer_slots_and_a_foreign_pointer_fails():
    rec = _rec()
    template = struct.pack("<QQiQ", 0x1000, 0, 7, 0x8010) + bytes(4)
    rec.launch(fn=1, grid=2, splits=1, threads=128, smem=0, template=template, argv_offsets=(0,),
               pointer_offsets=(0, 8, 20))
    assert rec.failed is None
    (step,) = rec.steps
    assert step[8] == ((0, 0, 0), (20, 1, 0x10))  # the null pointer stays a constant
    rec.launch(1, 2, 1, 128, 0, struct.pack("<Q", 0xdead0000), (0,), (0,))
    assert rec.failed and len(rec.steps) == 1


def test_memsets_and_framework_copies():
    rec = _rec()
    rec.memset("memset32", 0x8020, 0x7F800000, 4)
    assert rec.steps == [("memset32", 1, 0x20, 0x7F800000, 4)]
    rec.fail("a copy made by the framework")
    rec.fail("later reason")
    assert rec.failed == "a copy made by the framework"


def test_one_recording_per_thread():
    with _rec() as rec:
        assert recording.current() is rec
        with pytest.raises(RuntimeError):
            _rec().__enter__()
    assert recording.current() is None


def test_extent_bytes():
    assert recording.extent_bytes((2, 3, 4), (24, 4, 1), 2) == (24 + 2 * 4 + 3 + 1) * 2
    assert recording.extent_bytes((0, 3), (3, 1), 2) == 0


def test_tensor_map_views_keep_no_array_alive():
    """A recorded tensor map keeps the view's geometry, not its owner: a bound call must not pin the first
    call's caches (they may be gigabytes, and a server frees them per request)."""
    import gc
    import weakref

    from cuflash.arrays import DeviceArray

    class Owner:
        pass
    owner = Owner()
    alive = weakref.ref(owner)
    rec = _rec()
    view = DeviceArray(0x8000, (4, 2, 64), (128, 64, 1), "float16", 0, owner)
    rec.launch(1, 1, 1, 128, 0, bytes(16), (0,), (), maps=((0, view, (64,)),))
    del owner, view
    gc.collect()
    assert rec.failed is None and alive() is None
    (step,) = rec.steps
    assert step[9][0][1].shape == (4, 2, 64) and step[9][0][3:] == (1, 0)


def test_allocations_are_found_by_identity():
    """Outputs are found as the allocations they are, not by address: zero-size allocations share one."""
    rec = _rec()
    a, b = object(), object()
    rec.allocated(SimpleNamespace(ptr=0, shape=(0,), dtype="float32"), a, 0)
    rec.allocated(SimpleNamespace(ptr=0, shape=(0,), dtype="float32"), b, 0)
    assert rec.allocation_of(b) == 5 and rec.allocation_of(a) == 4 and rec.allocation_of(object()) is None


def test_call_scalar_offsets_are_recorded():
    """A CallScalar argument (an int cache_seqlens) is kept as a slot the bound call fills per call."""
    rec = _rec()
    rec.launch(1, 1, 1, 32, 0, bytes(16), (0, 8), (0,), scalar_offsets=(8,))
    assert rec.steps[0][10] == (8,) and issubclass(recording.CallScalar, __import__("ctypes").c_int32)
