"""Any image classification data: TFDS datasets by name, folders of one's own images, networks shaped to
the data, and the download check behind a proxy.
"""

import json
import pathlib
import re
import shutil
import socket
import threading

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from nmfjax import configuration, data, evaluation, image_folder, models, parallel
from nmfjax.errors import DatasetUnavailableError
from nmfjax.trainer import Trainer
from tests.conftest import (
    MOCK_DATA,
    ROOT,
    assert_one_error_line,
    mocked_tfds,
    run_process,
    script_command,
    train_command,
)
from tests.tiny_configs import tiny_config

TINY = ["--config.num_epochs=1", "--config.batch_size=10", "--config.eval_batch_size=10"]
TINY += ["--config.model.nmf.iterations=2", "--config.log_every_steps=1"]


# --- image folders, written from the CIFAR-10 subset ---


def _cifar_images(per_class: int) -> list[np.ndarray]:
    """``per_class`` CIFAR-10 test images of each of the classes 0, 1 and 2 (the subset's; mock data without it)."""
    shared = ROOT.parent / "shared" / "tfds"
    if (shared / "cifar10").is_dir():
        split = data.load_split("cifar10", "test", data_dir=str(shared), download=False)
    else:
        with mocked_tfds(100 * per_class):
            split = data.load_split("cifar10", "test")
    return [split.images[split.labels == label][:per_class] for label in range(3)]


CLASS_NAMES = ("airplane", "automobile", "bird")


def write_image_folder(root: pathlib.Path, per_class=(10, 4), grey=False, sizes=(32,)) -> pathlib.Path:
    """``root/{train,test}/{airplane,automobile,bird}/N.png`` with ``per_class`` images each (train, test);
    image ``N`` is resized to ``sizes[N % len(sizes)]``.
    """
    images = _cifar_images(sum(per_class))
    for name, pictures in zip(CLASS_NAMES, images, strict=True):
        for index, picture in enumerate(pictures):
            folder = root / ("train" if index < per_class[0] else "test") / name
            folder.mkdir(parents=True, exist_ok=True)
            image = Image.fromarray(picture).convert("L") if grey else Image.fromarray(picture)
            size = sizes[index % len(sizes)]
            image.resize((size, size)).save(folder / f"{index}.png")
    return root


def test_an_image_folder_reads_as_a_dataset_with_its_class_names(tmp_path):
    root = write_image_folder(tmp_path / "pets")
    info = data.dataset_info("image_folder", str(root))
    assert info.image_shape == (32, 32, 3) and info.class_names == ("airplane", "automobile", "bird")
    assert info.flip and info.download_host is None and info.crop_size() == 28
    train = data.load_split("image_folder", "train", data_dir=str(root))
    assert train.images.shape == (30, 32, 32, 3) and train.images.dtype == np.uint8
    assert data.load_split("image_folder", "test", data_dir=str(root)).images.shape == (12, 32, 32, 3)
    assert set(train.labels) == {0, 1, 2}
    first = data.load_split("image_folder", "train", data_dir=str(root), limit=6)
    assert len(set(first.labels)) > 1  # the first images mix the classes
    np.testing.assert_array_equal(first.images, train.images[:6])
    # the pixels are the files' own
    path, label = image_folder.scan(root).files["train"][0]
    np.testing.assert_array_equal(train.images[0], np.asarray(Image.open(path)))
    assert train.labels[0] == label


def test_grey_images_give_one_channel_and_mixed_sizes_need_image_size(tmp_path):
    root = write_image_folder(tmp_path / "grey", grey=True, sizes=(32, 40))
    info = data.dataset_info("image_folder", str(root))
    assert info.image_shape == (None, None, 1)
    with pytest.raises(ValueError, match="differ in size: set --config.image_size=N"):
        data.load_split("image_folder", "train", data_dir=str(root))
    split = data.load_split("image_folder", "test", data_dir=str(root), image_size=36)
    assert split.images.shape == (12, 36, 36, 1)
    config = configuration.apply_overrides(
        tiny_config(), {"dataset": "image_folder", "data_dir": str(root), "image_size": 36}
    )
    assert configuration.network_spec(config).input_shape == (31, 31, 1)  # 7/8 of 36


def _refusal(tmp_path, damage) -> str:
    root = write_image_folder(tmp_path / "data", per_class=(2, 1))
    damage(root)
    with pytest.raises(DatasetUnavailableError) as raised:
        data.dataset_info("image_folder", str(root))
    return str(raised.value)


def test_an_image_folder_without_a_split_is_refused(tmp_path):
    message = _refusal(tmp_path, lambda root: shutil.rmtree(root / "test"))
    assert "has no test/ folder" in message and "DIR/train/LABEL/IMAGE" in message


def test_an_empty_class_is_refused(tmp_path):
    message = _refusal(tmp_path, lambda root: (root / "train" / "cat").mkdir())
    assert message.endswith("train/cat is empty: put its images there, or remove the folder.")


def test_a_file_that_is_not_an_image_is_refused(tmp_path):
    message = _refusal(tmp_path, lambda root: (root / "train" / "bird" / "notes.txt").write_text("not a picture"))
    assert "train/bird/notes.txt is not an image Pillow can read" in message


def test_a_test_class_missing_from_train_is_refused(tmp_path):
    message = _refusal(tmp_path, lambda root: (root / "test" / "bird").rename(root / "test" / "ship"))
    assert "test/ship is a class that train/ does not have" in message


def test_train_py_refuses_an_image_folder_mistake_in_one_line(tmp_path):
    root = write_image_folder(tmp_path / "data", per_class=(2, 1))
    (root / "train" / "bird" / "notes.txt").write_text("not a picture")
    command = train_command(
        "--config",
        "configs/cnmf_1x1.py",
        f"--workdir={tmp_path / 'run'}",
        "--config.dataset=image_folder",
        f"--config.data_dir={root}",
    )
    assert_one_error_line(run_process(command, tmp_path / "p", timeout=120), "notes.txt is not an image")
    assert not (tmp_path / "run").exists()


# --- every network for the data's shape and classes ---


SHAPES = ((28, 28, 1), (32, 32, 3), (64, 64, 3))
# Every network with every input shape; each network and each shape with 10 and with 100 classes.
NETWORK_CASES = [
    (architecture, shape, (10, 100)[(index + offset) % 2])
    for index, architecture in enumerate(models.ARCHITECTURES)
    for offset, shape in enumerate(SHAPES)
]
# A train step (a program to compile) for each network once, each shape and each count of classes among them.
TRAINED_CASES = [
    (architecture, shape, classes)
    for index, (architecture, shape, classes) in enumerate(NETWORK_CASES)
    if shape == SHAPES[(index // len(SHAPES)) % len(SHAPES)]
]


def test_the_trained_cases_hold_each_network_shape_and_count_of_classes():
    assert {case[0] for case in TRAINED_CASES} == set(models.ARCHITECTURES)
    assert {case[1] for case in TRAINED_CASES} == set(SHAPES)
    assert {case[2] for case in TRAINED_CASES} == {10, 100}


def _network_for(monkeypatch, architecture, shape, classes):
    """The config, spec and network of ``architecture`` for made-up data of ``shape`` and ``classes``."""
    info = data.DatasetInfo("made_up", shape, tuple(str(label) for label in range(classes)))
    monkeypatch.setattr(data, "dataset_info", lambda name, data_dir=None: info)
    config = tiny_config(architecture, batch_size=4, eval_batch_size=4, **{"model.nmf.iterations": 1})
    spec = configuration.validate_config(config, 1)
    return config, spec, models.build(spec, config.seed)


@pytest.mark.parametrize("architecture, shape, classes", NETWORK_CASES)
def test_each_network_builds_for_the_datas_shape_and_classes(monkeypatch, architecture, shape, classes):
    _, spec, model = _network_for(monkeypatch, architecture, shape, classes)
    crop = shape[0] * 7 // 8
    assert spec.input_shape == (crop, crop, shape[2]) and spec.features[-1] == classes
    # Every layer's shapes, traced without running them (the train step below runs them).
    images = data.center_crop(np.zeros((8, *shape), np.uint8), crop)
    logits = nnx.eval_shape(lambda network, inputs: network.logits(inputs), model, images)
    assert logits.shape == (8, classes)


@pytest.mark.parametrize("architecture, shape, classes", TRAINED_CASES)
def test_each_network_trains_a_step_for_the_data(monkeypatch, architecture, shape, classes):
    config, spec, model = _network_for(monkeypatch, architecture, shape, classes)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (8, *shape), dtype=np.uint8)
    labels = rng.integers(0, classes, 8).astype(np.int32)
    assert model.logits(data.center_crop(images, spec.input_shape[0])).shape == (8, classes)
    trainer = Trainer(config, spec, parallel.data_mesh(jax.devices()[:1]))
    before = jax.device_get(trainer.initial_state.params)
    state, totals = trainer.train_step(
        trainer.initial_state,
        trainer.put_replicated(images),
        trainer.put_replicated(labels),
        np.arange(4, dtype=np.int32),
        trainer.step_key(1, 0),
        evaluation.no_metrics(trainer.mesh),
    )
    assert int(totals["count"]) == 4 and np.isfinite(float(totals["loss"]))
    after = jax.device_get(state.params)
    changed = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)), before, after))
    assert all(changed), "every parameter learns in the step"


# --- train.py and evaluate, for each kind of data ---


def _train_and_evaluate(tmp_path, *arguments, prelude=""):
    workdir = tmp_path / "run"
    command = train_command(
        "--config", "configs/cnmf_1x1.py", f"--workdir={workdir}", *TINY, *arguments, prelude=prelude
    )
    trained = run_process(command, tmp_path / "train", timeout=300)
    assert trained.process.returncode == 0, trained.stderr[-3000:]
    evaluate = script_command("-m nmfjax.experiments", "evaluate", str(workdir), prelude=prelude)
    evaluated = run_process(evaluate, tmp_path / "evaluate", timeout=300)
    assert evaluated.process.returncode == 0, evaluated.stderr[-3000:]
    row = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[-1])
    return workdir, json.loads((workdir / "config.json").read_text()), row, evaluated.stdout


def test_train_py_and_evaluate_on_an_image_folder(tmp_path):
    root = write_image_folder(tmp_path / "shapes", per_class=(10, 4), grey=True, sizes=(30, 34))
    workdir, config, row, evaluated = _train_and_evaluate(
        tmp_path, "--config.dataset=image_folder", f"--config.data_dir={root}", "--config.image_size=32"
    )
    assert config["model"]["features"][-1] == 3 and config["augment"]["flip"] is True and config["image_size"] == 32
    assert row["epoch"] == 1 and 0 <= row["test_accuracy"] <= 1
    assert f"test accuracy {100 * row['test_accuracy']:.2f}%" in evaluated


def test_train_py_and_evaluate_on_another_tfds_dataset(tmp_path):
    prelude = MOCK_DATA.format(examples=20)
    workdir, config, row, evaluated = _train_and_evaluate(tmp_path, "--config.dataset=cifar100", prelude=prelude)
    assert config["model"]["features"] == [32, 64, 96, 100] and config["dataset"] == "cifar100"
    assert f"test accuracy {100 * row['test_accuracy']:.2f}%" in evaluated


# --- the download check behind a proxy ---


class ConnectProxy:
    """An HTTP proxy on a free local port that answers CONNECT to ``allowed`` with 200, to others with 403,
    and records the requests it got.
    """

    def __init__(self, allowed: str):
        self.allowed, self.requests = allowed, []
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:  # closed
                return
            with connection:
                request = b""
                while b"\r\n\r\n" not in request:
                    chunk = connection.recv(4096)
                    if not chunk:
                        break
                    request += chunk
                self.requests.append(request.decode("latin-1"))
                allowed = request.startswith(f"CONNECT {self.allowed}:443 ".encode())
                answer = b"200 Connection established" if allowed else b"403 Forbidden"
                connection.sendall(b"HTTP/1.1 " + answer + b"\r\n\r\n")

    def close(self):
        self.server.close()


@pytest.fixture
def proxy(monkeypatch):
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    server = ConnectProxy(allowed="downloads.invalid")
    yield server
    server.close()


def test_the_download_check_goes_through_the_https_proxy(proxy, monkeypatch):
    with pytest.raises(ConnectionError, match="cannot reach downloads.invalid \\("):
        data.check_host_reachable("downloads.invalid", timeout=2)  # no proxy: the name does not resolve
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    data.check_host_reachable("downloads.invalid", timeout=2)  # the proxy opens the connection
    assert proxy.requests[-1].startswith("CONNECT downloads.invalid:443 HTTP/1.1\r\n")
    with pytest.raises(ConnectionError, match=r"elsewhere.invalid through the proxy http://127.0.0.1:\d+ .*403"):
        data.check_host_reachable("elsewhere.invalid", timeout=2)


def test_the_download_check_sends_the_proxys_credentials_and_hides_them(proxy, monkeypatch):
    monkeypatch.setenv("https_proxy", proxy.url.replace("http://", "http://ada:s%40cret@"))
    data.check_host_reachable("downloads.invalid", timeout=2)
    assert "Proxy-Authorization: Basic YWRhOnNAY3JldA==\r\n" in proxy.requests[-1]  # ada:s@cret
    with pytest.raises(ConnectionError) as raised:
        data.check_host_reachable("elsewhere.invalid", timeout=2)
    assert "s%40cret" not in str(raised.value) and "ada:***@127.0.0.1" in str(raised.value)


def test_no_proxy_hosts_are_reached_directly(proxy, monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    monkeypatch.setenv("NO_PROXY", "downloads.invalid")
    with pytest.raises(ConnectionError, match=r"cannot reach downloads.invalid \("):
        data.check_host_reachable("downloads.invalid", timeout=2)
    assert proxy.requests == []


# --- the guide's "Your own data" (docs/own_data.md) ---


def _readme_output_after(marker: str) -> str:
    """The one line of the first output block (a code block of one line, no language) after ``marker``."""
    text = (ROOT / "docs" / "own_data.md").read_text()
    return re.search(r"\n```\n([^`\n]+)\n```\n", text[text.index(marker) :]).group(1)


def test_the_readmes_own_data_outputs_are_what_the_commands_print(tmp_path):
    config = configuration.default_config()
    cifar100 = configuration.apply_overrides(config, {"dataset": "cifar100"})
    shown = _readme_output_after("--config.dataset=cifar100 --show_config | tail -1")
    assert shown == configuration.describe_data_defaults(cifar100)
    root = tmp_path / "five"
    for split in ("train", "test"):
        for label in range(5):
            (root / split / f"class{label}").mkdir(parents=True)
            Image.fromarray(np.full((64, 64), 40 * label, np.uint8)).save(root / split / f"class{label}" / "0.png")
    folder = configuration.apply_overrides(config, {"dataset": "image_folder", "data_dir": str(root)})
    assert _readme_output_after("For a folder of 64x64 grey images in 5 classes") == (
        configuration.describe_data_defaults(folder)
    )
