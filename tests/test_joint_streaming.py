"""Joint fine-tuning on a streamed image folder and with the latents table on disk
(deqlit/lit/joint_data.py, latent_store.py, latent_table.py, run_joint.py)."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from deqlit.data.registry import load_images
from deqlit.guards import UserInputError
from deqlit.guards import UserInputError
from deqlit.lit.joint_module import JointFineTuneModule
from deqlit.lit.latent_store import DiskLatentStore, read_disk_latents, table_bytes, wants_disk
from deqlit.lit.latent_table import LatentTable, RowAdam
from deqlit.lit.joint_data import JointDataModule
from deqlit.runs.joint import evaluate, run_joint
from deqlit.models.build import build_noise_model
from tests.conftest import perturbed_unet
from tests.tiny import TINY_MODEL

COUNT = 20        # folder images: sorted files 0 and 10 are 'test', the other 18 'train'


def write_pngs(folder: Path, count: int = COUNT) -> Path:
    gen = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(count):
        Image.fromarray(gen.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(folder / f"im{k:03d}.png")
    return folder


def folder_config(tmp_path: Path, out: str, max_steps: int, **joint) -> dict:
    ckpt = tmp_path / "tiny.pt"
    if not ckpt.exists():
        torch.save(perturbed_unet(seed=3, scale=0.1, dtype=torch.float32).state_dict(), ckpt)
    images = tmp_path / "pngs"
    if not images.exists():
        write_pngs(images)
    section = {"split": "all", "num_images": 4, "prior_split": "train", "batch_size": 2, "prior_batch_size": 3,
               "timesteps": 3, "grad": "onestep", "solver": "picard", "max_iter": 3, "tol": 0.0,
               "init": "ddim-inversion", "latent_lr": 0.05, "network_lr": 1e-3, "ema_decay": 0.9,
               "checkpoint_every": 2, "image_every": 0, "compare_every": 0, "kid_every": 0,
               "latents_on_disk": False, "out": str(tmp_path / out)}
    section.update(joint)
    return {"data": {"name": f"folder:{images}", "resolution": 8, "channels": 1, "root": "ignored"},
            "model": dict(TINY_MODEL), "diffusion": {"beta_schedule": "linear", "num_diffusion_timesteps": 1000},
            "checkpoint": {"path": str(ckpt), "ema": True}, "joint": section,
            "trainer": {"max_steps": max_steps, "enable_progress_bar": False, "accelerator": "cpu"}}


def tables(run: Path, module=None) -> dict[str, torch.Tensor]:
    """The run's latents and network: latents.pt's x_T (or the on-disk rows) and ema.pt."""
    payload = torch.load(run / "latents.pt", weights_only=True)
    if "x_T" in payload:
        x_T = payload["x_T"]
    else:
        x_T = read_disk_latents(run, payload["indices"], payload["sphere"], tuple(payload["image_shape"]))
    return {"x_T": x_T, **torch.load(run / "ema.pt", weights_only=True)}


def assert_same(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=atol), key


# ---- streamed data = the same images in memory ---------------------------------------------------
def test_a_streamed_folder_run_equals_the_in_memory_construction(tmp_path):
    cfg = folder_config(tmp_path, "streamed", 3)
    streamed = run_joint(cfg)
    # Oracle: the same images decoded whole (load_images), the module built by hand, a bare Trainer.
    name, joint = cfg["data"]["name"], cfg["joint"]
    targets = load_images(name, "all", 8, 1, limit=4)
    prior = load_images(name, "train", 8, 1)
    model, abar, _ = build_noise_model(cfg)
    module = JointFineTuneModule(model, abar, 4, (1, 8, 8), timesteps=3, grad="onestep", solver="picard",
                                 solver_options=dict(max_iter=3, tol=0.0), init="ddim-inversion",
                                 latent_lr=0.05, network_lr=1e-3, ema_decay=0.9, image_every=0)
    trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    trainer.fit(module, datamodule=JointDataModule(targets, prior, 2, 3, seed=joint.get("seed", 0)))
    assert streamed.global_step == module.global_step == 3
    assert torch.allclose(streamed.latents.weight, module.latents.weight, atol=1e-6)
    assert bool(streamed.latents.ready.all()) and bool(module.latents.ready.all())
    for p, q in zip(streamed.model.parameters(), module.model.parameters()):
        assert torch.allclose(p, q, atol=1e-6)
    metrics = json.loads((tmp_path / "streamed" / "metrics.json").read_text())
    assert metrics["num_images"] == 4 and len(metrics["ema"]["psnr"]) == 4 and metrics["per_image"]


def test_the_chunked_evaluation_equals_one_chunk_and_drops_lists_above_the_limit():
    gen = torch.Generator().manual_seed(0)
    net = perturbed_unet(seed=3, scale=0.1, dtype=torch.float32)
    module = JointFineTuneModule(net, build_abar(), 5, (1, 8, 8), timesteps=3)
    module.initialize_rows(torch.arange(5), torch.zeros(5, 1, 8, 8))
    images = torch.rand(5, 1, 8, 8, generator=gen) * 2 - 1
    prior = torch.rand(6, 1, 8, 8, generator=gen) * 2 - 1

    def run(chunk, limit):
        return evaluate({"m": net}, module.latents, torch.arange(5), lambda idx: images[idx], module.chain,
                        prior, module.abar, chunk=chunk, per_image_limit=limit, reference_limit=3)["m"]
    whole, chunked, summary = run(64, 1000), run(2, 1000), run(2, 4)
    for key, value in whole.items():
        assert value == pytest.approx(chunked[key], rel=1e-6, abs=1e-9), key
    assert len(whole["psnr"]) == 5 and "psnr" not in summary and "autocorr" not in summary
    assert summary["psnr_min"] == pytest.approx(min(whole["psnr"]))
    assert summary["psnr_mean"] == pytest.approx(sum(whole["psnr"]) / 5)


def build_abar() -> torch.Tensor:
    from deqlit.diffusion.schedule import alphas_cumprod, linear_betas
    return alphas_cumprod(linear_betas())


# ---- bad input ---------------------------------------------------------------------------------
def test_an_empty_split_is_refused_and_a_short_one_warns(tmp_path):
    cfg = folder_config(tmp_path, "short", 1, num_images=50, batch_size=4)
    with pytest.warns(UserWarning, match="asked for 50 images but split 'all'.*holds 20; using 20"):
        module = run_joint(cfg)
    assert module.latents.weight.shape[0] == 20
    single = tmp_path / "single"
    write_pngs(single, 1)              # one image: it is 'test', so 'train' is empty
    cfg = folder_config(tmp_path, "empty", 1, split="train")
    cfg["data"]["name"] = f"folder:{single}"
    with pytest.raises(ValueError, match="empty"):
        run_joint(cfg)
    cfg = folder_config(tmp_path, "zero", 1, num_images=0)
    with pytest.raises(UserInputError, match="num_images must be a positive integer or null"):
        run_joint(cfg)
    with pytest.raises(UserInputError, match="holds no images"):
        from deqlit.lit.joint_data import fine_tuning_count
        fine_tuning_count(0, None, "valid", "celeba")


# ---- the latents table on disk -------------------------------------------------------------------
def test_auto_puts_the_table_on_disk_above_the_threshold():
    assert table_bytes(1000, 3072) == 3 * 1000 * 3072 * 4
    assert not wants_disk("auto", 1000, 3072, 2 * 1024 ** 3)
    assert wants_disk("auto", 100_000, 3072, 2 * 1024 ** 3)         # 3.7 GB
    assert wants_disk(True, 1, 1) and not wants_disk(False, 10 ** 9, 10 ** 6)
    with pytest.raises(ValueError, match="auto, true or false"):
        wants_disk("yes", 1, 1)


def test_the_store_rolls_back_to_a_checkpoint_after_later_writes(tmp_path):
    """RowAdam on a disk table = RowAdam in memory; after checkpoint(2) and more steps,
    rollback(2) gives every array its values at the checkpoint, also on a reopened store."""
    gen = torch.Generator().manual_seed(1)
    target = torch.randn(6, 8, generator=gen)
    store = DiskLatentStore(tmp_path / "latents", 6, 8, create=True)
    disk, memory = LatentTable(6, (2, 4), store=store), LatentTable(6, (2, 4))
    opts = [RowAdam([t.weight], lr=0.1, store=t.store) for t in (disk, memory)]

    def step(rows):
        for table, opt in zip((disk, memory), opts):
            index = torch.tensor(rows)
            new = index[~table.is_ready(index)]
            table.fill(new, target[new] + 1)
            opt.zero_grad()
            (table(index).flatten(1) - target[index]).pow(2).sum().backward()
            opt.step()
            table.renormalize(index)
    step([0, 1])
    step([1, 2])
    store.checkpoint(2)
    saved = {name: array.copy() for name, array in store.arrays.items()}
    step([2, 3])
    step([4, 0])
    assert torch.equal(disk.weight, memory.weight) and torch.equal(disk.ready, memory.ready)
    state = opts[1].state[memory.weight]
    assert torch.equal(store.exp_avg, state["exp_avg"]) and torch.equal(store.step, state["step"])
    assert not np.array_equal(store.arrays["weight"], saved["weight"])
    del disk, opts
    reopened = DiskLatentStore(tmp_path / "latents", 6, 8, create=False)      # like a new process
    reopened.rollback(2)
    for name, array in saved.items():
        assert np.array_equal(reopened.arrays[name], array), name
    with pytest.raises(ValueError, match="cannot be put back to step 1"):
        reopened.rollback(1)


def test_a_disk_table_stays_off_the_device_and_casts_its_rows():
    store_dir = Path(__import__("tempfile").mkdtemp())
    table = LatentTable(3, (1, 2, 2), store=DiskLatentStore(store_dir, 3, 4, create=True))
    table.fill(torch.arange(3), torch.ones(3, 1, 2, 2))
    table.double()
    assert table.weight.dtype == torch.float32 and table(torch.tensor([1])).dtype == torch.float64
    assert set(table.state_dict()) == {"on_disk_rows"}
    memory = LatentTable(3, (1, 2, 2))
    with pytest.raises(RuntimeError, match="latents_on_disk true"):
        memory.load_state_dict(table.state_dict())


def test_on_disk_latents_equal_in_memory_ones_and_stay_out_of_the_checkpoint(tmp_path):
    memory = run_joint(folder_config(tmp_path, "memory", 3))
    disk = run_joint(folder_config(tmp_path, "disk", 3, latents_on_disk=True))
    assert disk.latents.store is not None and memory.latents.store is None
    assert torch.allclose(memory.latents.weight, disk.latents.weight, atol=1e-6)
    assert_same(tables(tmp_path / "memory"), tables(tmp_path / "disk"))
    # The in-memory checkpoint holds the table and RowAdam's moments; the disk one only markers.
    mem_ckpt = torch.load(tmp_path / "memory" / "checkpoints" / "last.ckpt", weights_only=True)
    ckpt = torch.load(tmp_path / "disk" / "checkpoints" / "last.ckpt", weights_only=True)
    assert "latents.weight" in mem_ckpt["state_dict"] and "latents.ready" in mem_ckpt["state_dict"]
    assert "latents.weight" not in ckpt["state_dict"] and "latents.ready" not in ckpt["state_dict"]
    assert int(ckpt["state_dict"]["latents.on_disk_rows"]) == 4
    assert ckpt["optimizer_states"][0]["state"] == {0: {"on_disk": True}}
    mem_state = mem_ckpt["optimizer_states"][0]["state"][0]
    folder = tmp_path / "disk" / "latents"
    for name in ("exp_avg", "exp_avg_sq", "step"):
        assert np.allclose(np.load(folder / f"{name}.npy"), mem_state[name].numpy(), atol=1e-6), name
    assert np.load(folder / "ready.npy").all()


def test_a_disk_run_resumed_after_a_crash_equals_an_uninterrupted_one(tmp_path):
    """'split' runs 3 steps (checkpoints at 2 and, at the end, 3), then resumes from step-2.ckpt
    (as after a kill at step 3: the files ran ahead of that checkpoint) and from last.ckpt."""
    run_joint(folder_config(tmp_path, "whole", 5, latents_on_disk=True))
    run_joint(folder_config(tmp_path, "split", 3, latents_on_disk=True))
    split = tmp_path / "split"
    run_joint(folder_config(tmp_path, "split", 4, latents_on_disk=True), resume=str(split / "checkpoints" / "step-2.ckpt"))
    run_joint(folder_config(tmp_path, "split", 5, latents_on_disk=True), resume="last")
    assert_same(tables(tmp_path / "whole"), tables(split))
    whole_folder = tmp_path / "whole" / "latents"
    for name in ("weight", "exp_avg", "exp_avg_sq", "step", "ready"):
        assert np.allclose(np.load(whole_folder / f"{name}.npy"), np.load(split / "latents" / f"{name}.npy"),
                           atol=1e-6), name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # the resume check names the setting before the checkpoint is read
        with pytest.raises(UserInputError, match=r"joint\.latents_on_disk \(saved True, now False\)"):
            run_joint(folder_config(tmp_path, "split", 6), resume="last")


def test_sample_py_regenerates_from_a_disk_runs_latents_pointer(tmp_path):
    """latents.pt of an on-disk run holds no x_T; sample.py --latents reads the rows it points to
    (the first --num-images of them) and regenerates what the in-memory run's latents.pt does."""
    from deqlit.commands.sample import main as sample_main
    from deqlit.runs.latents import read_latents
    run_joint(folder_config(tmp_path, "memory", 2))
    run_joint(folder_config(tmp_path, "disk", 2, latents_on_disk=True))
    memory = read_latents(tmp_path / "memory")               # a run folder or its file
    pointer = read_latents(tmp_path / "disk" / "latents.pt", limit=3)
    assert pointer["x_T"].shape == (3, 1, 8, 8) and pointer["indices"].tolist() == [0, 1, 2]
    assert torch.allclose(pointer["x_T"], memory["x_T"][:3], atol=1e-6)
    outputs = []
    for run in ("memory", "disk"):
        argv = ["--ckpt", str(tmp_path / run / "ema.pt"), "--latents", str(tmp_path / run / "latents.pt"),
                "--num-images", "3", "--out", str(tmp_path / f"samples-{run}"), "--no-progress",
                "--solver", "sequential", "--model.ch", "8", "--model.ch_mult", "[1,2]",
                "--model.num_res_blocks", "1", "--model.attn_resolutions", "[4]",
                "--model.resolution", "8", "--model.norm_groups", "2", "--data.resolution", "8"]
        sample_main(argv)
        outputs.append(torch.load(tmp_path / f"samples-{run}" / "samples.pt", weights_only=True)["x0"])
    assert outputs[1].shape[0] == 3 and torch.allclose(outputs[0][:3], outputs[1], atol=1e-5)
