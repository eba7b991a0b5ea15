"""cem_fast.field_store: a chunk is reused only when its digest checks and it holds the blocks expected of it."""
import numpy as np
import pytest

from cem_fast.field_store import FieldStore
from cem_fast.pipeline.field_pass import ChunkSamples


def chunk(rng, n=6):
    return ChunkSamples(tiles=rng.randint(0, 4, n).astype(np.int32), blocks=rng.randint(0, 50, n).astype(np.int32),
                        effect=rng.randn(n), se=rng.rand(n), draws=np.full(n, 5, np.int32), df=np.full(n, 4.0),
                        gated=rng.rand(n) < 0.5, coarse=30 + rng.randn(n, 2), fine=30 + rng.randn(n, 3),
                        forwards=17)


def test_a_saved_chunk_loads_back_exactly(tmp_path, rng):
    store = FieldStore(tmp_path / "f", "k1", {"seed": 0})
    c, blocks = chunk(rng), np.arange(3, 9)
    store.save(2, 0, blocks, c)
    got = store.load(2, 0, blocks)
    for k in ChunkSamples.ARRAYS:
        np.testing.assert_array_equal(getattr(got, k), getattr(c, k))
    assert got.forwards == 17 and store.dropped == 0


@pytest.mark.parametrize("spoil", ["flip", "truncate", "other blocks", "other key", "missing"])
def test_a_chunk_that_does_not_check_is_recomputed(tmp_path, rng, spoil):
    store = FieldStore(tmp_path / "f", "k1", {"seed": 0})
    blocks = np.arange(3, 9)
    store.save(2, 0, blocks, chunk(rng))
    path = next((tmp_path / "f" / "chunks").glob("*.npz"))
    raw = bytearray(path.read_bytes())
    if spoil == "flip":
        raw[len(raw) // 3] ^= 0x01
        path.write_bytes(bytes(raw))
    elif spoil == "truncate":
        path.write_bytes(bytes(raw[: len(raw) // 2]))
    elif spoil == "missing":
        path.unlink()
    if spoil == "other blocks":
        blocks = np.arange(4, 10)
    if spoil == "other key":
        store = FieldStore(tmp_path / "f", "k2", {"seed": 1}, fresh=True)
        store.save(2, 0, blocks, chunk(rng))  # written under k2 ...
        store.key = "k3"  # ... read as another field's
    assert store.load(2, 0, blocks) is None
    assert store.dropped == (0 if spoil == "missing" else 1)


def test_another_field_in_the_folder_is_named_by_what_differs(tmp_path):
    FieldStore(tmp_path / "f", "k1", {"seed": 0, "tile": 32})
    with pytest.raises(ValueError, match=r"inputs differ in: seed, tile\)"):
        FieldStore(tmp_path / "f", "k2", {"seed": 1, "tile": 16})
    (tmp_path / "f" / "field.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot be read as a field"):
        FieldStore(tmp_path / "f", "k1", {"seed": 0})
    FieldStore(tmp_path / "f", "k1", {"seed": 0}, fresh=True)  # fresh replaces whatever was there


def test_a_file_where_the_folder_should_be_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="is a file, expected a folder"):
        FieldStore(tmp_path / "f", "k1", {"seed": 0})


@pytest.mark.parametrize("spoil", ["flip", "missing"])
def test_a_tiles_samples_read_from_a_spoiled_chunk_are_refused_in_one_line(tmp_path, rng, spoil):
    """A finished field reads a tile's samples from its chunks on demand: a chunk changed or lost since it was
    written is an error naming it (never samples that do not check)."""
    store = FieldStore(tmp_path / "f", "k1", {"seed": 0})
    c, blocks = chunk(rng), np.arange(3, 9)
    store.save(2, 0, blocks, c)
    tile = int(c.tiles[0])
    got_blocks, coarse, fine = store.samples_of(2, [0], tile)
    keep = c.tiles == tile
    np.testing.assert_array_equal(got_blocks, c.blocks[keep])
    np.testing.assert_array_equal(coarse, c.coarse[keep])
    np.testing.assert_array_equal(fine, c.fine[keep])
    path = next((tmp_path / "f" / "chunks").glob("*.npz"))
    if spoil == "flip":
        raw = bytearray(path.read_bytes())
        raw[len(raw) // 3] ^= 0x01
        path.write_bytes(bytes(raw))
    else:
        path.unlink()
    with pytest.raises(ValueError, match=r"^field chunk .*\.npz (changed since it was written|does not read).*: "
                                         r"run the field again to recompute it$"):
        store.samples_of(2, [0], tile)
