"""Model registry: weight resolution, digests, preprocessing, class lookup, real-image sanity, FX."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.fx
import torchvision.models
import torchvision.transforms as T
from ierf.images import demo_image
from ierf.models import (
    available_models,
    build_module,
    class_index,
    file_digest,
    imagenet_class_names,
    load_model,
    model_spec,
    resolve_weights,
)
from ierf.models.names import ARCHITECTURES
from PIL import Image

WEIGHT_ENUMS = {
    "resnet18": torchvision.models.ResNet18_Weights,
    "resnet50": torchvision.models.ResNet50_Weights,
    "resnet101": torchvision.models.ResNet101_Weights,
    "vgg16": torchvision.models.VGG16_Weights,
    "vgg16_bn": torchvision.models.VGG16_BN_Weights,
    "densenet121": torchvision.models.DenseNet121_Weights,
    "googlenet": torchvision.models.GoogLeNet_Weights,
    "inception_v3": torchvision.models.Inception_V3_Weights,
    "mobilenet_v2": torchvision.models.MobileNet_V2_Weights,
}
TORCHVISION_ARCHS = list(WEIGHT_ENUMS)


@pytest.fixture(scope="module")
def lite0():
    return load_model("efficientnet_lite0")


@pytest.fixture
def no_weight_dirs(tmp_path, monkeypatch):
    """Point every weight location at empty temporary folders."""
    weights_dir, torch_home = tmp_path / "weights", tmp_path / "torch_home"
    weights_dir.mkdir()
    monkeypatch.setenv("IERF_WEIGHTS_DIR", str(weights_dir))
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    return weights_dir, torch_home / "hub" / "checkpoints"


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """One saved resnet18 state_dict (45 MB) shared by the weight-lookup tests; they hard-link it."""
    torch.manual_seed(1)
    state = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(state, path)
    return path, state


def _place(source: Path, destination: Path) -> Path:
    destination.parent.mkdir(parents=True, exist_ok=True)
    os.link(source, destination)
    return destination


# --- registry and weights -------------------------------------------------------------------------


def test_available_models_lists_every_supported_architecture():
    assert available_models()[0] == "efficientnet_lite0"
    assert set(available_models()) == {"efficientnet_lite0", *TORCHVISION_ARCHS}
    assert tuple(available_models()) == ARCHITECTURES  # the torch-free list the service checks configs against


def test_unknown_model_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown model 'resnet5'.*resnet50"):
        load_model("resnet5")


@pytest.mark.parametrize("arch", TORCHVISION_ARCHS)
def test_weight_file_names_are_torchvisions_canonical_ones(arch):
    urls = {Path(weights.url).name for weights in WEIGHT_ENUMS[arch]}
    assert set(model_spec(arch).weight_files) <= urls
    v1 = Path(WEIGHT_ENUMS[arch].IMAGENET1K_V1.url).name
    assert model_spec(arch).weight_files[0] == v1


def test_missing_weights_message_names_file_and_every_place(no_weight_dirs):
    weights_dir, hub_dir = no_weight_dirs
    with pytest.raises(FileNotFoundError) as info:
        load_model("resnet50")
    message = str(info.value)
    for fragment in (
        "resnet50-0676ba61.pth",
        "resnet50-11ad3fa6.pth",
        str(weights_dir),
        str(hub_dir),
        "random_init",
    ):
        assert fragment in message


def test_missing_weights_message_when_env_dir_unset(tmp_path, monkeypatch):
    monkeypatch.delenv("IERF_WEIGHTS_DIR", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"\$IERF_WEIGHTS_DIR \(not set\)"):
        resolve_weights("vgg16")


def test_explicit_missing_weights_file_is_named(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_model("resnet18", weights=missing)


def test_a_directory_given_as_weights_is_named_as_such(tmp_path):
    with pytest.raises(ValueError, match=r"is a directory; give the weights file inside it"):
        load_model("resnet18", weights=tmp_path)


def test_weights_from_env_dir_load_exactly_and_digest_is_file_sha256(no_weight_dirs, resnet18_file):
    weights_dir, _ = no_weight_dirs
    path = _place(resnet18_file[0], weights_dir / "resnet18-f37072fd.pth")
    state = resnet18_file[1]
    model = load_model("resnet18")
    assert model.weights_source == str(path)
    assert model.weights_digest == hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    for key, value in model.module.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)
    assert not model.module.training
    assert not any(p.requires_grad for p in model.module.parameters())


def test_weights_from_torch_hub_cache(no_weight_dirs, resnet18_file):
    _, hub_dir = no_weight_dirs
    path = _place(resnet18_file[0], hub_dir / "resnet18-f37072fd.pth")
    assert resolve_weights("resnet18") == path
    assert load_model("resnet18").weights_source == str(path)


def test_resnet50_accepts_either_torchvision_file(no_weight_dirs):
    weights_dir, _ = no_weight_dirs
    (weights_dir / "resnet50-11ad3fa6.pth").write_bytes(b"")
    assert resolve_weights("resnet50").name == "resnet50-11ad3fa6.pth"


def test_explicit_weights_win_over_env_dir(no_weight_dirs, resnet18_file, tmp_path):
    weights_dir, _ = no_weight_dirs
    (weights_dir / "resnet18-f37072fd.pth").write_bytes(b"would fail to load")
    explicit = _place(resnet18_file[0], tmp_path / "mine.pth")
    model = load_model("resnet18", weights=str(explicit))
    assert model.weights_source == str(explicit)
    torch.testing.assert_close(model.module.conv1.weight, resnet18_file[1]["conv1.weight"], rtol=0, atol=0)


def test_wrapped_data_parallel_checkpoint_loads(tmp_path):
    torch.manual_seed(3)
    state = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 7}, path)
    model = load_model("resnet18", weights=path)
    torch.testing.assert_close(model.module.fc.bias, state["fc.bias"], rtol=0, atol=0)


def test_densenet_checkpoints_with_old_key_names_load(tmp_path):
    torch.manual_seed(4)
    state = torchvision.models.densenet121(weights=None).state_dict()
    old_style = {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v for k, v in state.items()}
    assert "features.denseblock1.denselayer1.norm.1.weight" in old_style
    path = tmp_path / "densenet121-a639ec97.pth"
    torch.save(old_style, path)
    model = load_model("densenet121", weights=path)
    torch.testing.assert_close(
        model.module.features.denseblock1.denselayer1.norm1.weight,
        state["features.denseblock1.denselayer1.norm1.weight"],
    )


def test_checkpoints_saved_before_batch_norm_counted_batches_load(tmp_path: Path) -> None:
    """torchvision's 2017 files (``densenet121-a639ec97.pth``, ``vgg16_bn-6c64b313.pth``) predate PyTorch 0.4.1's
    ``num_batches_tracked`` buffers, which only training reads; ``load_state_dict`` fills them in (no
    ``_metadata`` version), so torchvision loads them, and the registry must not refuse them as "missing"."""
    torch.manual_seed(4)
    state = torchvision.models.densenet121(weights=None).state_dict()
    old_style = {
        re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v
        for k, v in state.items()
        if not k.endswith("num_batches_tracked")
    }
    path = tmp_path / "densenet121-a639ec97.pth"
    torch.save(old_style, path)
    model = load_model("densenet121", weights=path)
    torch.testing.assert_close(model.module.features.norm0.running_var, state["features.norm0.running_var"])


def test_weights_for_another_architecture_are_refused(resnet18_file):
    with pytest.raises(ValueError, match=r"does not fit mobilenet_v2: missing features\.0\.0\.weight"):
        load_model("mobilenet_v2", weights=resnet18_file[0])


def test_integer_weights_are_refused_in_one_line_naming_the_file(resnet18_file, tmp_path):
    """They failed inside load_state_dict: a traceback per tensor, no file named."""
    _, state = resnet18_file
    path = tmp_path / "ints.pth"
    torch.save({k: v.long() if v.is_floating_point() else v for k, v in state.items()}, path)
    with pytest.raises(ValueError, match=rf"weights file {path} does not fit resnet18: floating-point .* torch\.int64"):
        load_model("resnet18", weights=path)


def test_corrupt_and_pickled_weight_files_are_refused(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match=r"cannot load weights from .*garbage\.pth"):
        load_model("resnet18", weights=garbage)
    pickled = tmp_path / "object.pth"
    torch.save({"model": object()}, pickled)  # weights_only=True refuses arbitrary objects
    with pytest.raises(ValueError, match=r"cannot load weights from .*object\.pth"):
        load_model("resnet18", weights=pickled)
    not_tensors = tmp_path / "numbers.pth"
    torch.save({"a": 1}, not_tensors)
    with pytest.raises(ValueError, match=r"does not hold a state_dict"):
        load_model("resnet18", weights=not_tensors)


def test_random_init_is_explicit_reproducible_and_leaves_global_rng_alone():
    with pytest.raises(ValueError, match="either weights"):
        load_model("resnet18", weights="x.pth", random_init=True)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = load_model("resnet18", random_init=True)
    assert torch.equal(torch.rand(3), expected_next)
    second = load_model("resnet18", random_init=True)
    other = load_model("resnet18", random_init=True, seed=1)
    assert first.weights_source == "random_init(seed=0)"
    assert first.weights_digest == second.weights_digest != other.weights_digest
    assert re.fullmatch(r"[0-9a-f]{16}", first.weights_digest)
    torch.testing.assert_close(first.module.conv1.weight, second.module.conv1.weight, rtol=0, atol=0)
    assert not torch.equal(first.module.conv1.weight, other.module.conv1.weight)


def test_bad_device_is_a_value_error():
    with pytest.raises(ValueError, match="invalid device"):
        load_model("efficientnet_lite0", random_init=True, device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            load_model("efficientnet_lite0", random_init=True, device="cuda")
    else:
        with pytest.raises(ValueError, match=r"this machine has \d+ CUDA device\(s\)"):
            load_model("efficientnet_lite0", random_init=True, device=f"cuda:{torch.cuda.device_count()}")
    if not torch.backends.mps.is_available():  # torch's own error was a page of text about macOS builds
        with pytest.raises(ValueError, match="MPS is not available on this machine"):
            load_model("efficientnet_lite0", random_init=True, device="mps")
    with pytest.raises(ValueError, match="cannot move efficientnet_lite0 to device 'hpu': No module named"):
        load_model("efficientnet_lite0", random_init=True, device="hpu")  # was a ModuleNotFoundError
    with pytest.raises(ValueError, match="device 'meta' holds no values"):
        load_model("efficientnet_lite0", random_init=True, device="meta")


def test_an_unreadable_weights_file_is_one_value_error(tmp_path, resnet18_file, monkeypatch):
    """Opened once for the digest and the weights: a PermissionError escaped (root ignores chmod, so the
    refusal is simulated)."""
    path = tmp_path / "weights.pth"
    path.write_bytes(resnet18_file[0].read_bytes())
    real_open = Path.open

    def refused(self: Path, *args: object, **kwargs: object) -> object:
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", refused)
    with pytest.raises(ValueError, match=rf"cannot read weights file {re.escape(str(path))}: Permission denied"):
        load_model("resnet18", weights=path)


def test_weights_rewritten_in_place_with_their_mtime_restored_get_a_new_digest(tmp_path, resnet18_file):
    """The digest keys the cache: it must describe the bytes loaded, also when a file is rewritten in place
    with the same size and its mtime put back (the digest used to stay that of the first version)."""
    path = tmp_path / "weights.pth"
    state = {key: value.clone() for key, value in resnet18_file[1].items()}
    torch.save(state, path)
    first = load_model("resnet18", weights=path)
    stat = path.stat()
    state["fc.bias"] += 1.0
    torch.save(state, path)
    assert path.stat().st_size == stat.st_size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    second = load_model("resnet18", weights=path)
    assert second.weights_digest == hashlib.sha256(path.read_bytes()).hexdigest()[:16] != first.weights_digest
    torch.testing.assert_close(second.module.fc.bias, state["fc.bias"], rtol=0, atol=0)
    assert file_digest(path) == second.weights_digest


def test_bundled_lite0_digest_is_stable_and_matches_its_file_name(lite0):
    path = Path(lite0.weights_source)
    assert path.name == "efficientnet-lite0-57934424.pth"
    # Hub-style file names carry the first hex digits of the file's sha256.
    assert lite0.weights_digest.startswith("57934424")
    assert lite0.weights_digest == file_digest(path) == hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    assert load_model("efficientnet_lite0").weights_digest == lite0.weights_digest


def test_loading_and_running_lite0_prints_nothing(capfd):
    model = load_model("efficientnet_lite0")
    with torch.no_grad():
        model.module(torch.zeros(1, 3, 224, 224))
    assert capfd.readouterr() == ("", "")


def test_loaded_model_fields(lite0):
    assert lite0.name == "efficientnet_lite0"
    assert lite0.input_size == 224
    assert lite0.class_names == imagenet_class_names() and len(lite0.class_names) == 1000
    assert lite0.input_mean == (127.0,) * 3 and lite0.input_std == (128.0,) * 3
    assert lite0.device == torch.device("cpu")
    assert not lite0.module.training


# --- preprocessing --------------------------------------------------------------------------------


def test_preprocess_versions_are_short_and_distinguish_normalisations(lite0):
    resnet = load_model("resnet18", random_init=True)
    assert lite0.preprocess_version != resnet.preprocess_version
    assert all(len(v) <= 32 for v in (lite0.preprocess_version, resnet.preprocess_version))


def test_lite0_normalisation_is_tf_style(lite0):
    for value, expected in ((127, 0.0), (255, 1.0), (0, -127 / 128)):
        x = lite0.preprocess(np.full((300, 400, 3), value, dtype=np.uint8))
        assert x.shape == (3, 224, 224) and x.dtype == torch.float32
        torch.testing.assert_close(x, torch.full_like(x, expected))


def test_imagenet_preprocessing_matches_torchvision_transforms():
    model = load_model("resnet18", random_init=True)
    image = Image.fromarray(demo_image("chelsea"))
    reference = T.Compose(
        [
            T.Resize(256),
            T.CenterCrop(224),
            T.ToTensor(),
            T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )(image)
    ours = model.preprocess(image)
    # Resampling only the crop region may differ by one intensity level at a few pixels.
    assert (ours - reference).abs().max() <= 1.01 / (255 * 0.224)
    assert (ours - reference).abs().gt(1e-5).float().mean() < 0.01


def test_torchvisions_second_generation_files_get_their_own_preprocessing(tmp_path):
    """IMAGENET1K_V2 files were trained and evaluated at resize 232, not 256: they were preprocessed as V1."""
    torch.manual_seed(2)
    state = torchvision.models.mobilenet_v2(weights=None).state_dict()
    v1, v2 = tmp_path / "mobilenet_v2-b0353104.pth", tmp_path / "mobilenet_v2-7ebf99e0.pth"
    torch.save(state, v1)
    os.link(v1, v2)
    first, second = load_model("mobilenet_v2", weights=v1), load_model("mobilenet_v2", weights=v2)
    assert first.preprocessing.resize == 256 and second.preprocessing.resize == 232
    assert first.preprocess_version != second.preprocess_version  # cache keys tell them apart
    image = Image.fromarray(demo_image("chelsea"))
    reference = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V2.transforms()(image)
    ours = second.preprocess(image)
    assert (ours - reference).abs().max() <= 1.01 / (255 * 0.224)
    assert (ours - reference).abs().gt(1e-5).float().mean() < 0.02


def test_a_renamed_second_generation_file_gets_its_resize_from_the_caller(tmp_path: Path) -> None:
    """Platforms rename weight files (``/models/mnv2/model.pth``): the registry, which knows V2 files by name,
    then resized to 256. ``resize=`` states it; the version (cache keys) follows; below the crop is refused."""
    torch.manual_seed(2)
    path = tmp_path / "model.pth"
    torch.save(torchvision.models.mobilenet_v2(weights=None).state_dict(), path)
    plain, stated = load_model("mobilenet_v2", weights=path), load_model("mobilenet_v2", weights=path, resize=232)
    assert (plain.preprocessing.resize, stated.preprocessing.resize) == (256, 232)
    assert plain.preprocess_version != stated.preprocess_version
    image = Image.fromarray(demo_image("chelsea"))
    reference = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V2.transforms()(image)
    assert (stated.preprocess(image) - reference).abs().gt(1e-5).float().mean() < 0.02
    with pytest.raises(ValueError, match="resize must be an integer >= mobilenet_v2's centre crop 224, got 200"):
        load_model("mobilenet_v2", weights=path, resize=200)


def test_a_canonical_file_whose_bytes_differ_from_its_name_is_reported(resnet18_file, tmp_path, caplog):
    """torch's loader checks no sums: 64 zeroed bytes in a downloaded file loaded silently."""
    source, _ = resnet18_file
    canonical = _place(source, tmp_path / "resnet18-f37072fd.pth")  # random weights, not torchvision's file
    with caplog.at_level("WARNING", logger="ierf.models.registry"):
        load_model("resnet18", weights=canonical)
        load_model("resnet18", weights=source)  # a name of your own: nothing to compare
        load_model("efficientnet_lite0")  # the bundled file matches its name
    reports = [r.getMessage() for r in caplog.records if "sha256" in r.getMessage()]
    assert len(reports) == 1 and "resnet18-f37072fd.pth" in reports[0] and "not f37072fd" in reports[0], reports


def test_random_init_is_reproducible_from_threads_and_leaves_the_global_generator_alone():
    """Four threads with seeds 0-3 drew from each other's seeds: wrong weights, and a wrong cached digest."""
    from concurrent.futures import ThreadPoolExecutor

    def load(seed: int) -> str:
        return load_model("resnet18", random_init=True, seed=seed).weights_digest

    expected = [load(seed) for seed in range(4)]
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    from ierf.models import registry

    registry._random_init_digests.clear()  # computed afresh, concurrently
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(load, [0, 1, 2, 3] * 3)) == expected * 3
    assert torch.equal(torch.random.get_rng_state(), state)


def test_preprocess_accepts_pil_numpy_grey_and_rgba_alike(lite0):
    rgb = demo_image("coffee")
    from_numpy = lite0.preprocess(rgb)
    torch.testing.assert_close(lite0.preprocess(Image.fromarray(rgb)), from_numpy)
    rgba = np.concatenate([rgb, np.full((*rgb.shape[:2], 1), 7, np.uint8)], axis=2)
    torch.testing.assert_close(lite0.preprocess(rgba), from_numpy)
    torch.testing.assert_close(lite0.preprocess(Image.fromarray(rgba)), from_numpy)
    grey = rgb[:, :, 1]
    for variant in (grey, grey[:, :, None], Image.fromarray(grey)):
        x = lite0.preprocess(variant)
        assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    sixteen_bit = Image.fromarray(grey.astype(np.uint16) * 257)
    torch.testing.assert_close(lite0.preprocess(sixteen_bit), lite0.preprocess(grey))


def test_preprocess_rejects_bad_images(lite0):
    with pytest.raises(TypeError, match="uint8"):
        lite0.preprocess(np.zeros((50, 50, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        lite0.preprocess(np.zeros((50, 50, 2), dtype=np.uint8))
    with pytest.raises(ValueError, match="empty"):
        lite0.preprocess(np.zeros((0, 50, 3), dtype=np.uint8))
    with pytest.raises(TypeError, match=r"PIL\.Image or a uint8 numpy array"):
        lite0.preprocess([[1, 2, 3]])


def test_extreme_aspect_ratio_resamples_only_the_crop(lite0):
    strip = np.random.default_rng(0).integers(0, 256, size=(2, 20000, 3), dtype=np.uint8)
    assert lite0.resize_crop(strip).shape == (224, 224, 3)


def test_normalize_takes_uint8_batches_only(lite0):
    pixels = lite0.resize_crop(demo_image("rocket"))
    batch = torch.from_numpy(pixels).permute(2, 0, 1)[None].repeat(2, 1, 1, 1)
    out = lite0.normalize(batch)
    assert out.shape == (2, 3, 224, 224) and out.dtype == torch.float32
    torch.testing.assert_close(out[1], lite0.preprocess(demo_image("rocket")))
    with pytest.raises(TypeError, match="uint8"):
        lite0.normalize(batch.float())
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        lite0.normalize(batch[:, :2])


# --- class names ----------------------------------------------------------------------------------


def test_imagenet_class_names_are_unique():
    names = imagenet_class_names()
    assert len(names) == len(set(names)) == 1000
    assert names[967] == "espresso" and names[282] == "tiger cat"


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        (967, 967),
        (np.int64(5), 5),
        ("967", 967),
        (" 12 ", 12),
        ("Espresso", 967),
        ("TIGER CAT", 282),
        ("cheeseburg", 933),
    ],
)
def test_class_index_resolves(query, expected):
    assert class_index(query) == expected


def test_class_index_exact_match_beats_substring():
    # "tiger" is also a substring of "tiger cat", "tiger shark", "tiger beetle": exact wins.
    assert class_index("tiger") == imagenet_class_names().index("tiger")


def test_class_index_errors_list_candidates():
    with pytest.raises(ValueError, match=r"ambiguous; candidates: .*282 'tiger cat'"):
        class_index("cat")
    with pytest.raises(ValueError, match="no class name contains 'zzzz'"):
        class_index("zzzz")
    with pytest.raises(ValueError, match=r"out of range.*0\.\.999"):
        class_index(1000)
    with pytest.raises(ValueError, match="out of range"):
        class_index("-1")
    with pytest.raises(TypeError):
        class_index(True)
    with pytest.raises(TypeError):
        class_index(2.5)
    assert class_index("b", ["a", "b"]) == 1


def test_top_k(lite0):
    logits = torch.zeros(1000)
    logits[[3, 7]] = torch.tensor([2.0, 5.0])
    top = lite0.top_k(logits[None], k=3)
    assert [s.index for s in top[:2]] == [7, 3] and top[0].name == lite0.class_names[7]
    assert top[0].probability == pytest.approx(np.exp(5) / (np.exp(5) + np.exp(2) + 998))
    with pytest.raises(ValueError, match="one image"):
        lite0.top_k(torch.zeros(2, 1000))


# --- real images, real weights --------------------------------------------------------------------


def _top(model, name, k=3):
    with torch.no_grad():
        logits = model.module(model.preprocess(demo_image(name))[None])
    return model.top_k(logits, k)


def test_lite0_recognises_espresso(lite0):
    top = _top(lite0, "coffee")
    assert top[0].index == 967 and top[0].probability == pytest.approx(0.96, abs=0.02)


def test_lite0_sees_a_cat_in_chelsea(lite0):
    top = _top(lite0, "chelsea")
    assert {s.index for s in top} == {281, 282, 285}  # tabby, tiger cat, Egyptian cat


# --- FX traceability (the SRD engine compiles models from their FX graph) -------------------------


@pytest.mark.parametrize("name", ["efficientnet_lite0", *TORCHVISION_ARCHS])
def test_every_architecture_is_fx_traceable(name):
    with torch.device("meta"):  # graph only: no time spent initialising VGG's 138 M parameters
        module = build_module(name).eval()
    graph = torch.fx.symbolic_trace(module)
    assert any(node.op == "call_module" for node in graph.graph.nodes)


@pytest.mark.parametrize("name", ["efficientnet_lite0", "resnet18"])
def test_traced_graph_computes_the_same_logits(name, lite0):
    model = lite0 if name == "efficientnet_lite0" else load_model(name, random_init=True)
    traced = torch.fx.symbolic_trace(model.module)
    x = model.preprocess(demo_image("coffee"))[None]
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model.module(x), rtol=0, atol=0)


def test_lite0_keeps_static_same_padding_modules(lite0):
    """The engine must see the package's real graph: ZeroPad2d + functional conv2d, no rewriting."""
    stem = lite0.module._conv_stem
    assert isinstance(stem.static_padding, torch.nn.ZeroPad2d)
    assert stem.static_padding.padding == (0, 1, 0, 1)


@pytest.mark.parametrize(("name", "aux"), [("googlenet", ("aux1.", "aux2.")), ("inception_v3", ("AuxLogits.",))])
def test_inception_checkpoints_load_without_their_auxiliary_classifiers(name, aux):
    """torchvision's ImageNet checkpoints for GoogLeNet and Inception-v3 hold the training-only auxiliary
    classifiers; the served model (transform_input on, as torchvision sets it for those weights) has none."""
    with torch.device("meta"):
        full = getattr(torchvision.models, name)(weights=None, aux_logits=True, init_weights=False)
        served = build_module(name)
    assert served.transform_input and not served.aux_logits
    keys = set(full.state_dict())
    assert any(k.startswith(aux) for k in keys)
    assert model_spec(name).fix_state_dict is not None
    assert set(model_spec(name).fix_state_dict(dict.fromkeys(keys))) == set(served.state_dict())


def test_a_googlenet_checkpoint_with_auxiliary_classifiers_is_served_and_explained(tmp_path):
    import ierf

    torch.manual_seed(0)
    state = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=True).state_dict()
    path = tmp_path / "googlenet-1378be20.pth"
    torch.save(state, path)
    model = load_model("googlenet", weights=path)
    assert model.input_size == 224 and model.weights_source == str(path)
    x = model.preprocess(demo_image("chelsea"))[None]
    dec = ierf.SRD(model.module).decompose(x)
    torch.testing.assert_close(dec.logits, model.module(x), rtol=1e-4, atol=1e-5)
    total = dec.saliency(281).sum()
    assert abs(float(total) - float(dec.logits[0, 281])) <= 1e-4 * float(dec.logits.abs().max())


def test_a_cuda_index_at_the_device_count_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """Devices count from 0: on a machine with one GPU, ``cuda:1`` does not exist and the refusal should
    say how many there are, not surface as whatever error moving the model there raises."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"device 'cuda:1' requested but this machine has 1 CUDA device\(s\)"):
        load_model("efficientnet_lite0", random_init=True, device="cuda:1")


# --- mutation round 7 -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", TORCHVISION_ARCHS)
def test_every_weight_file_gets_the_preprocessing_torchvision_trained_it_with(arch: str) -> None:
    """Each accepted file's resize, crop, mean and std are those of its torchvision weights entry (V1: resize
    256, V2: 232, Inception-v3: 342 -> 299), so a wrong resize for one file cannot hide behind the others."""
    spec = model_spec(arch)
    by_file = {Path(weights.url).name: weights for weights in WEIGHT_ENUMS[arch]}
    for file_name in spec.weight_files:
        reference = by_file[file_name].transforms()
        ours = spec.file_preprocessing.get(file_name, spec.preprocessing)
        assert (ours.resize, ours.crop) == (reference.resize_size[0], reference.crop_size[0]), file_name
        assert ours.mean == pytest.approx([m * 255 for m in reference.mean]), file_name
        assert ours.std == pytest.approx([s * 255 for s in reference.std]), file_name


def test_centre_crop_offset_rounds_like_torchvision() -> None:
    """A 300x454 photo resizes to 256x387: the crop's left edge is round(81.5) = 82, as torchvision's CenterCrop
    puts it; flooring it to 81 shifts the whole crop by one pixel."""
    model = load_model("resnet18", random_init=True)
    image = Image.fromarray(demo_image("chelsea")).resize((454, 300), Image.Resampling.BILINEAR)
    reference = T.Compose(
        [T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
    )(image)
    ours = model.preprocess(image)
    assert (ours - reference).abs().max() <= 1.01 / (255 * 0.224)
    assert (ours - reference).abs().gt(1e-5).float().mean() < 0.01


def test_env_dir_is_searched_before_the_torch_hub_cache(no_weight_dirs, resnet18_file) -> None:
    """Documented order: $IERF_WEIGHTS_DIR first, then the hub cache (a stale hub download must not win)."""
    weights_dir, hub_dir = no_weight_dirs
    hub_dir.mkdir(parents=True)
    (hub_dir / "resnet18-f37072fd.pth").write_bytes(b"stale download")
    chosen = _place(resnet18_file[0], weights_dir / "resnet18-f37072fd.pth")
    assert resolve_weights("resnet18") == chosen


def test_a_checkpoint_wrapping_weights_under_model_loads(tmp_path: Path) -> None:
    """Training checkpoints store the weights under "state_dict" or "model"; both are unwrapped."""
    torch.manual_seed(5)
    state = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path / "train_ckpt.pth"
    torch.save({"model": state, "epoch": 3}, path)
    loaded = load_model("resnet18", weights=path)
    torch.testing.assert_close(loaded.module.fc.bias, state["fc.bias"], rtol=0, atol=0)


def test_a_name_listed_twice_is_ambiguous_not_the_first() -> None:
    """An exact match wins only when it is unique: a class list naming two classes alike (a custom head) must
    not silently resolve to the first of them."""
    with pytest.raises(ValueError, match=r"ambiguous; candidates: 1 'crane', 2 'crane'"):
        class_index("crane", ["cat", "crane", "crane"])


def test_a_resize_equal_to_the_centre_crop_is_accepted() -> None:
    """Guards ``resize < crop`` in ``load_model``: its error says "an integer >= the centre crop", so weights
    evaluated as Resize(224) + CenterCrop(224) load with resize=224; only below the crop is refused."""
    loaded = load_model("resnet18", random_init=True, resize=224)
    assert (loaded.preprocessing.resize, loaded.preprocessing.crop) == (224, 224)
    with pytest.raises(ValueError, match="resize must be an integer >= resnet18's centre crop 224, got 223"):
        load_model("resnet18", random_init=True, resize=223)
