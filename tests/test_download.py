"""The first run on a new machine: CIFAR-10 downloaded and prepared by tfds, offline.

Only the network is replaced: tfds's ``DownloadManager.download_and_extract``
returns a local folder holding a small CIFAR-10 in the official binary layout,
and the one try to reach the dataset's host (``data.check_host_reachable``) succeeds.
Everything after it (TensorFlow preparing array_record files, decoding,
training) is real. Needs the ``download`` extra (TensorFlow), as CI has.
"""

import contextlib
import json
import pathlib
import socket
import textwrap
from unittest import mock

import numpy as np
import pytest
import requests
import tensorflow_datasets as tfds

from nmfjax import data
from tests.conftest import ROOT, run_process, script_command, train_command

pytest.importorskip("tensorflow", reason="preparing a TFDS dataset needs TensorFlow: pip install -e '.[download]'")

CLASSES = "airplane automobile bird cat deer dog frog horse ship truck".split()
TRAIN_PER_BATCH, TEST_IMAGES = 6, 10  # 5 train batches: 30 train images


def _write_batch(path: pathlib.Path, images: np.ndarray, labels: np.ndarray) -> None:
    """CIFAR-10's binary records: 1 label byte, then the R, G and B planes, each 32x32 row-major."""
    planes = images.transpose(0, 3, 1, 2).reshape(len(images), 3 * 32 * 32)
    path.write_bytes(np.concatenate([labels[:, None].astype(np.uint8), planes], axis=1).tobytes())


def write_cifar10_archive(folder: pathlib.Path, *, seed: int = 0, leave_out: str | None = None) -> dict:
    """``folder/cifar-10-batches-bin/`` as the extracted ``cifar-10-binary.tar.gz``; returns what it wrote."""
    rng = np.random.default_rng(seed)
    batches = folder / "cifar-10-batches-bin"
    batches.mkdir(parents=True)
    written = {"train": [], "test": []}
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    for name in names:
        count = TEST_IMAGES if name == "test_batch.bin" else TRAIN_PER_BATCH
        images = rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, count).astype(np.uint8)
        if name != leave_out:
            _write_batch(batches / name, images, labels)
        written["test" if name == "test_batch.bin" else "train"].append((images, labels))
    (batches / "batches.meta.txt").write_text("\n".join(CLASSES) + "\n\n")
    return {
        split: tuple(np.concatenate(parts) for parts in zip(*chunks, strict=True)) for split, chunks in written.items()
    }


@contextlib.contextmanager
def _fetch_from(folder: pathlib.Path):
    """Stands in for the network (the host is reachable, the fetch returns ``folder``), and only for it."""
    with (
        mock.patch.object(data, "check_host_reachable", lambda host: None),
        mock.patch.object(tfds.download.DownloadManager, "download_and_extract", lambda self, url: str(folder)),
    ):
        yield


# The same in a train.py process, as Python run before the script.
def _network_prelude(folder: pathlib.Path) -> str:
    return f"""
        import tensorflow_datasets as tfds
        from nmfjax import data
        data.check_host_reachable = lambda host: None
        tfds.download.DownloadManager.download_and_extract = lambda self, url: {str(folder)!r}
    """


def _sorted(images: np.ndarray, labels: np.ndarray):
    # tfds shuffles examples into its files; compare as sets of (label, pixels).
    order = np.lexsort((labels, images.reshape(len(images), -1).sum(1)))
    return images[order], labels[order]


def test_download_prepares_array_record_files_that_decode_to_the_archive_pixels(tmp_path):
    written = write_cifar10_archive(tmp_path / "archive")
    data_dir = tmp_path / "tfds"
    data_dir.mkdir()
    with _fetch_from(tmp_path / "archive"):
        train = data.load_split("cifar10", "train", data_dir=str(data_dir), download=True)
    test = data.load_split("cifar10", "test", data_dir=str(data_dir), download=False)  # prepared once
    for split, (images, labels) in (("train", written["train"]), ("test", written["test"])):
        loaded = train if split == "train" else test
        assert loaded.images.shape == (len(labels), 32, 32, 3) and loaded.images.dtype == np.uint8
        got, want = _sorted(loaded.images, loaded.labels), _sorted(images, labels.astype(np.int32))
        np.testing.assert_array_equal(got[0], want[0])  # R, G, B planes put back in HWC order
        np.testing.assert_array_equal(got[1], want[1])
    # array_record (random access), even with an explicit data_dir, where tfds's own default is tfrecord.
    assert list((data_dir / "cifar10" / "3.0.2").glob("cifar10-train.array_record-*"))


def test_train_py_downloads_into_tfds_default_data_dir_and_trains_an_epoch(tmp_path):
    """The README's main job from a fresh set-up, with default data_dir and download=True."""
    write_cifar10_archive(tmp_path / "archive")
    default_data_dir = tmp_path / "tensorflow_datasets"
    prelude = _network_prelude(tmp_path / "archive")
    overrides = ["--config.num_epochs=1", "--config.batch_size=10", "--config.eval_batch_size=10"]
    workdir = tmp_path / "run"
    child = run_process(
        train_command(
            "--config", str(ROOT / "configs" / "cnmf_1x1.py"), f"--workdir={workdir}", *overrides, prelude=prelude
        ),
        tmp_path / "process",
        env={"TFDS_DATA_DIR": str(default_data_dir)},
        timeout=420,
    )
    assert child.process.returncode == 0, child.stderr[-3000:]
    assert list((default_data_dir / "cifar10" / "3.0.2").glob("cifar10-test.array_record-*"))
    (row,) = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert row["epoch"] == 1 and np.isfinite(row["train_loss"])
    assert "30 train / 10 test images" in child.stdout


def test_no_network_is_named_as_the_cause(tmp_path):
    offline = requests.exceptions.ConnectionError("Max retries exceeded (NameResolutionError)")
    offline.__cause__ = socket.gaierror(-2, "Name or service not known")
    reachable = mock.patch.object(data, "check_host_reachable", lambda host: None)  # then the fetch fails
    with reachable, mock.patch.object(tfds.download.DownloadManager, "download_and_extract", side_effect=offline):
        with pytest.raises(data.DatasetUnavailableError, match=r"downloading it failed: no network .*ConnectionError"):
            data.load_split("cifar10", "train", data_dir=str(tmp_path), download=True)


@pytest.mark.parametrize("data_dir", [None, "given", "../shared/tfds"])
def test_the_offline_advice_never_suggests_the_directory_that_was_given(data_dir, tmp_path):
    given = str(tmp_path / "tfds") if data_dir == "given" else data_dir
    advice = data._offline_advice("cifar10", given)
    if given is None:
        assert advice.startswith("set --config.data_dir to a TFDS data directory")
    else:
        assert advice.startswith("point --config.data_dir at another TFDS data directory")
    assert ("--config.data_dir=../shared/tfds" in advice) == (data_dir != "../shared/tfds"), advice
    assert "subset" not in data._offline_advice("mnist", "../shared/tfds")


def test_a_failed_preparation_is_named_as_the_cause(tmp_path):
    write_cifar10_archive(tmp_path / "archive", leave_out="test_batch.bin")  # a broken archive
    (tmp_path / "tfds").mkdir()
    with _fetch_from(tmp_path / "archive"), pytest.raises(data.DatasetUnavailableError) as raised:
        data.load_split("cifar10", "train", data_dir=str(tmp_path / "tfds"), download=True)
    message = str(raised.value)
    assert "preparing it there failed" in message and "test_batch.bin" in message, message
    assert "network" not in message and "TensorFlow" not in message


def test_a_missing_module_is_named_with_the_extra_that_installs_it(tmp_path):
    """The reported bug: tfds's prepare path imports importlib_resources; without it, name that module."""
    write_cifar10_archive(tmp_path / "archive")
    prelude = "import sys\nsys.modules['importlib_resources'] = None  # as if it were not installed\n"
    prelude += textwrap.dedent(_network_prelude(tmp_path / "archive"))
    (tmp_path / "tfds").mkdir()
    script = tmp_path / "load.py"
    script.write_text(
        "import sys\nfrom nmfjax import cli, data\n"
        "with cli.exit_on_errors():\n"
        f"    data.load_split('cifar10', 'train', data_dir={str(tmp_path / 'tfds')!r}, download=True)\n"
    )
    child = run_process(script_command(script, prelude=prelude), tmp_path / "process", timeout=300)
    assert child.process.returncode == 2, child.stderr[-3000:]
    (line,) = child.stderr.strip().splitlines()
    assert line.startswith("error: ") and "'importlib_resources'" in line and ".[download]" in line, line


def test_a_dataset_prepared_as_tfrecord_is_explained(tmp_path):
    """tfds.load users often have CIFAR-10 as tfrecord, which has no random access."""
    write_cifar10_archive(tmp_path / "archive")
    data_dir = tmp_path / "tfds"
    data_dir.mkdir()
    with _fetch_from(tmp_path / "archive"):
        tfds.builder("cifar10", data_dir=str(data_dir), file_format="tfrecord").download_and_prepare(
            download_config=tfds.download.DownloadConfig(try_download_gcs=False)
        )
    with pytest.raises(data.DatasetUnavailableError, match=r"cannot be read as array_record.*another data directory"):
        data.load_split("cifar10", "test", data_dir=str(data_dir), download=True)


def test_offline_a_download_stops_at_once_naming_the_host_and_writes_nothing(tmp_path, monkeypatch):
    """No network at all (as in CI): one short try to reach the host, not tfds's minutes of retries."""
    monkeypatch.setattr(tfds.download.DownloadManager, "download_and_extract", mock.Mock(side_effect=AssertionError))
    data_dir = tmp_path / "tfds"
    data_dir.mkdir()
    with mock.patch.object(socket, "create_connection", side_effect=socket.gaierror(-2, "Name or service not known")):
        with pytest.raises(data.DatasetUnavailableError) as raised:
            data.load_split("cifar10", "train", data_dir=str(data_dir), download=True)
    message = str(raised.value)
    assert "no network" in message and "cannot reach www.cs.toronto.edu" in message, message
    assert "--config.data_dir=../shared/tfds" in message
    assert list(data_dir.iterdir()) == []  # nothing written into the data directory


def test_a_data_dir_that_does_not_exist_is_named_with_the_closest_one_and_not_created(tmp_path):
    (tmp_path / "tfds").mkdir()
    misspelled = tmp_path / "tfdss"
    for download in (True, False):
        with pytest.raises(data.DatasetUnavailableError) as raised:
            data.load_split("cifar10", "test", data_dir=str(misspelled), download=download)
        message = str(raised.value)
        assert f"config.data_dir={misspelled} does not exist (did you mean {tmp_path / 'tfds'}?)" in message
        assert ("mkdir -p" in message) == download, message
    assert sorted(path.name for path in tmp_path.iterdir()) == ["tfds"]
