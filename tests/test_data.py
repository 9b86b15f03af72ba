"""Offline data sets leave the global random state alone."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from conftest import write_fake_cifar

from geocomplexity.data import load_mnist1d


def test_mnist1d_shapes_determinism_and_rng_isolation():
    np.random.seed(7)
    random.seed(7)
    before_np, before_py = np.random.get_state()[1].copy(), random.getstate()
    a = load_mnist1d()
    assert np.array_equal(np.random.get_state()[1], before_np)
    assert random.getstate() == before_py
    assert a.x_train.shape == (4000, 40) and a.x_test.shape == (1000, 40)
    assert a.x_train.dtype == torch.float32 and a.y_train.dtype == torch.int64
    assert set(a.y_train.unique().tolist()) == set(range(10))
    b = load_mnist1d()
    assert torch.equal(a.x_train, b.x_train)


def test_cifar10_reads_the_python_format(tmp_path):
    from geocomplexity.data import load_cifar10

    root = write_fake_cifar(tmp_path / "cifar-10-batches-py")
    split = load_cifar10(tmp_path)  # the parent folder works too
    assert split.x_train.shape == (100, 3, 32, 32) and split.x_test.shape == (
        20,
        3,
        32,
        32,
    )
    assert split.y_train.dtype == torch.int64 and split.num_classes == 10
    assert torch.allclose(split.x_train.mean((0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(load_cifar10(root).x_test, split.x_test)


@pytest.mark.parametrize("protocol", [3, 4, 5])
def test_cifar10_batches_resaved_with_a_newer_pickle_protocol_are_read(
    tmp_path, protocol
):
    # protocol 5 pickles numpy arrays through numpy's _frombuffer, which the
    # restricted unpickler refused ("refusing to load numpy._core.numeric.
    # _frombuffer"): a CIFAR-10 folder re-saved from Python 3.8+ could not load
    from geocomplexity.data import load_cifar10

    want = load_cifar10(write_fake_cifar(tmp_path / "a" / "cifar-10-batches-py"))
    got = load_cifar10(
        write_fake_cifar(tmp_path / "b" / "cifar-10-batches-py", protocol=protocol)
    )
    assert torch.equal(got.x_train, want.x_train)
    assert torch.equal(got.y_test, want.y_test)


def test_load_hands_out_tensors_of_its_own():
    # the cached Split's tensors were handed out: standardising x_train in
    # place changed every later load("digits") in the process
    from geocomplexity.data import load

    first = load("digits")
    before = first.x_train.clone()
    first.x_train.sub_(first.x_train.mean(0))
    first.y_train[:] = 0
    again = load("digits")
    assert torch.equal(again.x_train, before)
    assert again.y_train.unique().numel() == 10


def test_cifar10_refuses_planted_pickles_and_bad_folders(tmp_path):
    import os
    import pickle

    import pytest

    from geocomplexity.data import load_cifar10

    root = write_fake_cifar(tmp_path / "c")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (root / "data_batch_3").write_bytes(pickle.dumps({b"data": Evil()}, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
        load_cifar10(root)
    assert not marker.exists()
    with pytest.raises(FileNotFoundError, match="no CIFAR-10 folder"):
        load_cifar10(tmp_path / "missing")
    (root / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3 is missing"):
        load_cifar10(root)
    write_fake_cifar(root)
    (root / "test_batch").write_bytes(
        pickle.dumps({b"data": np.zeros((2, 5)), b"labels": [0, 1]}, protocol=2)
    )
    with pytest.raises(ValueError, match=r"\(N, 3072\)"):
        load_cifar10(root)


def test_cifar10_names_the_batch_whose_pickle_does_not_load(tmp_path):
    # a truncated download, an empty or a text file: the unpickler's own error
    # came out alone ("--data-dir DIR: pickle data was truncated", "Ran out of
    # input", "invalid literal for int() with base 10"), naming no file
    import pytest

    from geocomplexity.data import load_cifar10

    root = write_fake_cifar(tmp_path / "c")
    whole = (root / "data_batch_3").read_bytes()
    for broken in (whole[: len(whole) // 2], b"", b"garbage\n"):
        (root / "data_batch_3").write_bytes(broken)
        with pytest.raises(ValueError, match=r"data_batch_3 is not a CIFAR-10 batch"):
            load_cifar10(root)


def test_cifar10_refuses_labels_and_pixels_outside_the_format(tmp_path):
    import pickle

    import pytest

    from geocomplexity.data import load_cifar10

    root = write_fake_cifar(tmp_path / "c")
    pixels = np.zeros((2, 3072), dtype=np.uint8)
    bad = {
        "labels 0-9": [
            {b"data": pixels, b"labels": [0, 17]},  # passed, then failed each run
            {b"data": pixels, b"labels": [-1, 3]},
            {b"data": pixels, b"labels": [0.5, 1.5]},  # quietly truncated
            # class names: the message's range raised a bare UFuncTypeError
            {b"data": pixels, b"labels": [b"cat", b"dog"]},
            {b"data": pixels, b"labels": ["cat", "dog"]},
        ],
        "N labels": [{b"data": pixels, b"labels": [[0, 1], [2, 3]]}],
        "0-255": [
            {b"data": np.full((2, 3072), 1e9), b"labels": [0, 1]},
            {b"data": np.full((2, 3072), b"x"), b"labels": [0, 1]},
        ],
    }
    for match, batches in bad.items():
        for batch in batches:
            (root / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
            with pytest.raises(ValueError, match=match):
                load_cifar10(root)


def test_load_digits_refuses_a_test_fraction_outside_0_1():
    pytest.importorskip("sklearn")
    from geocomplexity.data import load_digits

    # 1.0 or more left the training set empty, 0 the test set, with no error
    for bad in (0.0, 1.0, 1.5, -0.2, float("nan")):
        with pytest.raises(ValueError, match="test_fraction"):
            load_digits(test_fraction=bad)


def test_load_mnist1d_refuses_a_sample_count_below_one():
    # 0 to 9 raised numpy's 'need at least one array to stack'
    for bad in (0, -5, 5):
        with pytest.raises(ValueError, match="num_samples"):
            load_mnist1d(num_samples=bad)


def test_resnet_experiment_holds_one_copy_of_a_cifar_folder(fake_cifar, monkeypatch):
    # keyed by the string given: a relative and an absolute path to the same
    # folder held two copies (0.7 GB each at full size) for a worker's life
    from geocomplexity.experiments import resnet_width

    resnet_width._cifar_cached.cache_clear()
    monkeypatch.chdir(fake_cifar.parent)
    a = resnet_width._cifar(fake_cifar.name)
    b = resnet_width._cifar(fake_cifar)
    assert a is b and resnet_width._cifar_cached.cache_info().currsize == 1
    resnet_width._cifar_cached.cache_clear()


def test_cifar10_a_batch_that_cannot_be_read_is_not_called_malformed(
    tmp_path, monkeypatch
):
    # the read sat inside the unpickler's try: a batch the user may not read
    # (permission denied, an I/O error) came out as a ValueError, "is not a
    # CIFAR-10 batch ... a truncated download? extract cifar-10-python.tar.gz
    # again", which re-extracting does not fix and `except OSError` misses
    from pathlib import Path

    from geocomplexity.data import load_cifar10

    root = write_fake_cifar(tmp_path / "c")
    read_bytes = Path.read_bytes

    def denied(self):
        if self.name == "data_batch_2":
            raise PermissionError(13, "Permission denied", str(self))
        return read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(PermissionError, match="data_batch_2"):
        load_cifar10(root)


def test_mnist1d_loaded_in_two_threads_at_once_is_the_seeded_data_set():
    # make_dataset seeds numpy's global generator and draws from it for a
    # second or so: two threads loading at once drew from one stream by turns,
    # and both got data sets other than the seed's (and the restored global
    # state was whichever thread finished last's snapshot)
    import sys
    import threading

    want = load_mnist1d(num_samples=500)
    np.random.seed(7)
    before = np.random.get_state()[1].copy()
    got = [None, None]

    def work(i):
        got[i] = load_mnist1d(num_samples=500)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often, as a busy machine may
    try:
        threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    for split in got:
        assert torch.equal(split.x_train, want.x_train)
        assert torch.equal(split.y_train, want.y_train)
        assert torch.equal(split.x_test, want.x_test)
    assert np.array_equal(np.random.get_state()[1], before)


def test_mnist1d_loaded_beside_a_measurement_keeping_the_rngs_is_the_seeded_data():
    # rngs_kept (a loader iterated to measure it: a dataset's augmentation may
    # draw from numpy's generator) holds the library's global-RNG lock; a
    # lock of load_mnist1d's own let both run at once, drawing from numpy's
    # one stream by turns, and the load was not the seed's data set
    import sys
    import threading

    from geocomplexity.state import rngs_kept

    want = load_mnist1d(num_samples=500)
    started, done = threading.Event(), threading.Event()

    def augmenting_loader():
        with rngs_kept():
            started.set()
            while not done.is_set():
                np.random.rand()  # an augmentation's draws

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often, as a busy machine may
    thread = threading.Thread(target=augmenting_loader)
    try:
        thread.start()
        started.wait()
        got = [None]

        def load():
            got[0] = load_mnist1d(num_samples=500)

        loader = threading.Thread(target=load)
        loader.start()
        loader.join(timeout=0.5)  # waits for the block where the lock is shared
        done.set()
        loader.join()
    finally:
        done.set()
        thread.join()
        sys.setswitchinterval(interval)
    assert torch.equal(got[0].x_train, want.x_train)
    assert torch.equal(got[0].y_train, want.y_train)


def test_cifar10_batches_resaved_with_str_keys_are_read(tmp_path):
    # a batch loaded the common way, pickle.load(f, encoding="latin1"), has
    # str keys ("data", "labels"); re-saved so, it was refused as "not a
    # CIFAR-10 batch (no data/labels)", though both were there
    import pickle

    from geocomplexity.data import load_cifar10

    want = load_cifar10(write_fake_cifar(tmp_path / "a"))
    root = write_fake_cifar(tmp_path / "b")
    for path in root.iterdir():
        batch = pickle.loads(path.read_bytes(), encoding="latin1")
        path.write_bytes(pickle.dumps({k.decode(): v for k, v in batch.items()}, 4))
    got = load_cifar10(root)
    assert torch.equal(got.x_train, want.x_train)
    assert torch.equal(got.y_train, want.y_train)
    assert torch.equal(got.x_test, want.x_test)
    assert torch.equal(got.y_test, want.y_test)


def test_cifar10_folder_with_a_tilde_is_the_home_folder(tmp_path, monkeypatch):
    # a path from Python or a config file reaches us unexpanded
    from geocomplexity.data import load_cifar10

    write_fake_cifar(tmp_path / "data" / "cifar-10-batches-py")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert load_cifar10("~/data").x_train.shape == (100, 3, 32, 32)


def test_cifar10_missing_folder_names_the_files_and_the_fix(tmp_path):
    """A wrong folder said "no CIFAR-10 folder at X" alone, and the archive
    itself (not extracted) or the binary version's folder were each read as a
    missing folder or a missing data_batch_1 "--data-dir" (a flag
    load_cifar10 has not) must hold: neither named the fix.
    """
    import tarfile

    from geocomplexity.data import load_cifar10

    with pytest.raises(FileNotFoundError) as err:
        load_cifar10(tmp_path / "missing")
    for part in ("data_batch_1", "test_batch", "cifar-10-python.tar.gz"):
        assert part in str(err.value)
    # the archive, given itself or left unextracted in the folder
    src = write_fake_cifar(tmp_path / "src" / "cifar-10-batches-py")
    archive = tmp_path / "dl" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src, arcname="cifar-10-batches-py")
    for given in (archive, archive.parent):
        with pytest.raises(FileNotFoundError, match="extract it") as err:
            load_cifar10(given)
        assert "--data-dir" not in str(err.value)
    # the binary version: data_batch_1.bin ... test_batch.bin
    binary = tmp_path / "cifar-10-batches-bin"
    binary.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (binary / f"{name}.bin").write_bytes(b"\0" * 3073)
    with pytest.raises(FileNotFoundError, match="binary version"):
        load_cifar10(binary)
