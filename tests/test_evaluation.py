"""deqlit.evaluation: distances against NumPy/SciPy oracles, FID from a local Inception file that is
never downloaded, the offline random-feature distances, and their errors."""
from __future__ import annotations

import math
from unittest import mock

import numpy as np
import pytest
import scipy.linalg
import torch

from deqlit.evaluation import (INCEPTION_FILE, ImageMetrics, InceptionWeightsMissing, format_metrics,
                               kid, sample_metrics)
from deqlit.evaluation.distances import compute_kernel, frechet_metric, kernel_metric


def gaussian_features(n: int, dim: int, seed: int, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(dim, dim)) / math.sqrt(dim)          # a non-diagonal covariance
    return rng.normal(size=(n, dim)) @ mix + shift


def frechet_oracle(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 sqrtm(S_a S_b)), computed with SciPy."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(s_a @ s_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * root))


def kernel_oracle(a: np.ndarray, b: np.ndarray) -> float:
    """Unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3 over all rows (one 'subset' of everything)."""
    d = a.shape[1]
    k = lambda x, y: (x @ y.T / d + 1) ** 3                       # noqa: E731
    kaa, kbb, kab = k(a, a), k(b, b), k(a, b)
    m = len(a)
    return float((kaa.sum() - np.trace(kaa) + kbb.sum() - np.trace(kbb)) / (m * (m - 1))
                 - 2 * kab.mean())


@pytest.mark.parametrize("shift", [0.0, 0.7])
def test_frechet_distance_matches_scipy_on_gaussian_features(shift):
    a, b = gaussian_features(400, 12, seed=1), gaussian_features(300, 12, seed=2, shift=shift)
    metric = frechet_metric(12)
    metric.update(torch.from_numpy(a).float(), real=True)
    metric.update(torch.from_numpy(b).float(), real=False)
    expected = frechet_oracle(a.astype(np.float32).astype(np.float64), b.astype(np.float32).astype(np.float64))
    assert float(metric.compute()) == pytest.approx(expected, abs=1e-3)
    assert expected > (0.5 if shift else 0.01)   # the case is not trivially zero


def test_kernel_distance_matches_numpy_with_one_subset_of_all_rows():
    a, b = gaussian_features(60, 10, seed=3), gaussian_features(60, 10, seed=4, shift=0.3)
    metric = kernel_metric(10, subset_size=60, subsets=1)
    metric.update(torch.from_numpy(a).double(), real=True)
    metric.update(torch.from_numpy(b).double(), real=False)
    mean, std = compute_kernel(metric)
    assert mean == pytest.approx(kernel_oracle(a, b), rel=1e-6) and std == 0.0


@pytest.fixture(scope="module")
def faces() -> torch.Tensor:
    from deqlit.data.faces import load_faces
    return load_faces("train")[:64]


def test_random_feature_distances_are_zero_on_a_set_itself_and_grow_with_noise(faces):
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(faces.shape, generator=gen)
    fd, kd = [], []
    for level in (0.0, 0.1, 0.2, 0.4, 0.8):
        values = sample_metrics((faces + level * noise).clamp(-1, 1), faces, "fd-random,kd-random",
                                random_width=8, kid_subset_size=32, kid_subsets=20)
        fd.append(values["fd-random"])
        kd.append(values["kd-random"])
    scale = fd[-1]
    # The unbiased kernel estimate of a finite set against itself is slightly negative, not 0.
    assert abs(fd[0]) < 1e-4 * scale and abs(kd[0]) < 0.05 * kd[-1]
    assert all(x < y for x, y in zip(fd, fd[1:])), fd
    assert all(x < y for x, y in zip(kd, kd[1:])), kd


def test_random_features_are_recorded_and_never_called_fid(faces):
    values = sample_metrics(faces[:32], faces[32:], ["fd-random"], random_seed=7, random_width=16)
    described = values["features"]["random"]
    assert described["seed"] == 7 and described["width"] == 16 and described["dim"] == 16 * 4 * 16
    assert described["in_channels"] == 1 and described["comparable_with_published_fid"] is False
    assert "fid" not in values and "kid" not in values
    assert "NOT comparable with published FIDs" in values["note"]
    assert "NOT comparable" in format_metrics(values)
    # Another seed embeds differently, so its distance differs: the seed matters and is recorded.
    other = sample_metrics(faces[:32], faces[32:], ["fd-random"], random_seed=8, random_width=16)
    assert other["fd-random"] != pytest.approx(values["fd-random"], rel=1e-3)


def test_kid_helper_ranks_held_out_faces_above_grey_and_noise(faces):
    from deqlit.data.faces import load_faces
    held_out = load_faces("test")
    gen = torch.Generator().manual_seed(0)
    k_faces = kid(faces, held_out)
    k_grey = kid(faces, torch.zeros_like(held_out))
    k_noise = kid(faces, torch.randn(held_out.shape, generator=gen).clamp(-1, 1))
    assert k_faces < k_grey and k_faces < k_noise


def test_bad_names_and_shapes_are_refused_with_the_fix(faces):
    with pytest.raises(ValueError, match="choose from fid, kid, fd-random, kd-random"):
        sample_metrics(faces, faces, "fid,frechet")
    with pytest.raises(ValueError, match="differ in shape"):
        sample_metrics(faces, faces.expand(-1, 3, -1, -1), "fd-random")
    with pytest.raises(ValueError, match="1 or 3 channels"):
        sample_metrics(faces[:, :, 0], faces, "fd-random")


def test_a_missing_inception_file_names_it_its_source_and_the_offline_metrics(tmp_path):
    missing = tmp_path / "nowhere" / INCEPTION_FILE
    with pytest.raises(InceptionWeightsMissing) as info:
        ImageMetrics("fid", channels=3, fid_weights=missing)
    message = str(info.value)
    assert str(missing) in message and "torch-fidelity" in message and "fd-random" in message
    with pytest.raises(InceptionWeightsMissing, match="--fid-weights"):
        ImageMetrics("kid", channels=1, fid_weights=None)
    not_inception = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(1)}, not_inception)
    with pytest.raises(ValueError, match="Inception-v3 state_dict"):
        ImageMetrics("fid", channels=1, fid_weights=not_inception)


@pytest.fixture(scope="module")
def fake_inception_file(tmp_path_factory):
    """Random weights in torch-fidelity's Inception layout, built without any download."""
    fe = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    cls = fe.FeatureExtractorInceptionV3
    with mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: {}), \
            mock.patch.object(cls, "load_state_dict", lambda self, *a, **k: None):
        net = cls("inception-v3-compat", ["2048"])
    # He-scaled weights keep activations O(1) through the 94 conv layers (the default init shrinks
    # them to ~1e-5, where every kernel value is 1 and KID is 0 whatever the images).
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * (2 / fan_in) ** 0.5)
    path = tmp_path_factory.mktemp("inception") / INCEPTION_FILE
    torch.save(net.state_dict(), path)
    return path


@pytest.mark.slow
def test_fid_and_kid_compute_from_a_local_file_and_never_download(fake_inception_file, faces):
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    def no_download(*args, **kwargs):
        raise AssertionError("the Inception weights were fetched from the network")

    real = faces[:5]
    with mock.patch.object(fe, "load_state_dict_from_url", no_download):
        metrics = ImageMetrics("fid,kid", channels=1, fid_weights=fake_inception_file)
    metrics.update(real, real=True)
    metrics.update(real, real=False)
    itself = metrics.compute()
    metrics.reset(real=False)               # keeps the real features, forgets the generated ones
    metrics.update(torch.zeros_like(real), real=False)
    other = metrics.compute()
    assert itself["features"]["inception"]["weights"] == str(fake_inception_file)
    assert math.isfinite(other["fid"]) and other["fid"] > 0
    assert abs(itself["fid"]) < 1e-3 * other["fid"]
    assert abs(itself["kid"]) < 0.05 * other["kid"]
    assert "note" not in itself          # real FID/KID carry no random-feature caveat


def test_sample_py_writes_metrics_against_a_dataset_and_fails_before_sampling(tmp_path):
    import json

    from deqlit.commands.sample import main
    metrics = main(["--timesteps", "3", "--num-images", "4", "--solver", "sequential",
                    "--metrics", "fd-random,kd-random", "--ref-data", "faces", "--out", str(tmp_path)])
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["fd-random"] == metrics["fd-random"] > 0 and "kd-random_std" in written
    assert written["ref_data"] == "faces" and written["num_reference"] == 84 and written["num_samples"] == 4
    assert written["features"]["random"]["seed"] == 0 and "fid" not in written
    with pytest.raises(InceptionWeightsMissing, match="fd-random"):
        main(["--metrics", "fid", "--fid-weights", str(tmp_path / "none.pth"), "--out", str(tmp_path / "b")])
    assert not (tmp_path / "b").exists()      # failed before any sampling


def _tiny_train_cfg(tmp_path) -> dict:
    from deqlit.config import load_config, set_path
    cfg = load_config(__import__("pathlib").Path(__file__).resolve().parent.parent / "configs" / "faces.yaml")
    for key, value in {"model.ch": 16, "model.ch_mult": [1, 2], "model.num_res_blocks": 1,
                       "model.attn_resolutions": [], "model.norm_groups": 8, "model.resolution": 16,
                       "data.resolution": 16, "train.max_steps": 4, "train.steps_per_epoch": 4,
                       "train.checkpoint_every": 4, "train.sample_every": 0, "train.warmup_steps": 1,
                       "train.sample_timesteps": 3, "train.metrics_every": 2, "train.metrics_count": 6,
                       "train.metrics": "fd-random,kd-random", "train.out": str(tmp_path / "run")}.items():
        set_path(cfg, key, value)
    return cfg


def test_training_logs_random_feature_metrics_every_n_steps(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from deqlit.lit.metrics_callback import SampleMetrics, metrics_callbacks
    from deqlit.runs.sections import resolve
    from deqlit.runs.training import run_training
    torch.set_num_threads(1)
    cfg = _tiny_train_cfg(tmp_path)
    module = run_training(cfg)
    events = EventAccumulator(str(tmp_path / "run" / "tb" / "version_0")).Reload()
    for tag in ("metrics/fd-random", "metrics/kd-random"):
        steps = [e.step for e in events.Scalars(tag)]
        assert steps == [2, 4], (tag, steps)
        assert all(math.isfinite(e.value) for e in events.Scalars(tag))
    # Sample i always starts from seed + i: the figures do not depend on the batching.
    (callback,) = metrics_callbacks(resolve(cfg, "train"))     # as run_training resolves it
    callback.on_fit_start(None, module)
    by_three = callback.measure(module)["fd-random"]
    callback.batch_size = 1
    assert callback.measure(module)["fd-random"] == pytest.approx(by_three, rel=1e-6)
    assert isinstance(callback, SampleMetrics) and metrics_callbacks({"train": {"metrics_every": 0}}) == []
