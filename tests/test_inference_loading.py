"""Loading a model for inference.

- One device-and-precision rule (mmdiff.placement): auto resolves to the accelerator in bf16 when there is
  one (the CPU in fp32 here); evaluation and serving pass device and dtype through; anything that
  reserves GPUs and would compute on the CPU is refused.
- Integrity: an adapter's files are checked against its checksums.json; a flipped byte or a truncated
  file is an error naming the file.
"""

import shutil

from pathlib import Path

import pytest
import torch

from evaluation.evaluate import GenerateStage, load_evaluation_config
from mmdiff import MMDiffConfig, MMDiffModel
from mmdiff.configuration import ConfigError, load_config
from mmdiff.placement import PlacementError, resolve_placement
from mmdiff.zoo.spec import ModelSpec

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("single_thread")


def test_auto_is_the_cpu_in_fp32_without_an_accelerator_and_explicit_values_are_kept():
    assert not torch.cuda.is_available()  # this suite runs on CPU machines
    assert resolve_placement() == ("cpu", "float32")
    assert resolve_placement(None, None) == ("cpu", "float32")
    assert resolve_placement("cpu", "bfloat16") == ("cpu", "bfloat16")
    with pytest.raises(PlacementError, match="'cuda' asked for, but no CUDA device is visible"):
        resolve_placement("cuda", "auto", who="test")
    with pytest.raises(PlacementError, match="dtype 'half' is not one of"):
        resolve_placement("cpu", "half")
    with pytest.raises(PlacementError, match="device 'gpu0' is not a device torch knows"):
        resolve_placement("gpu0")
    for device in ("auto", "cpu"):
        with pytest.raises(PlacementError, match="the actor reserves 0.5 GPU.* would compute on the CPU"):
            resolve_placement(device, "auto", reserved_gpus=0.5, who="the actor")


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    config = load_config(REPO / "configs/mmdiff/tiny_sd15.yaml", MMDiffConfig)
    model = MMDiffModel.from_specs(ModelSpec(family="sd15", source="tiny"),
                                   ModelSpec(family="clip_vision", source="tiny"), config)
    model.base_spec = ModelSpec(family="sd15", source="tiny")
    model.image_encoder_spec = ModelSpec(family="clip_vision", source="tiny")
    return model.save_pretrained(tmp_path_factory.mktemp("placement") / "adapter")


def test_evaluation_generates_in_the_configured_device_and_dtype(adapter, tmp_path):
    config = load_evaluation_config(REPO / "configs/eval/demo.yaml", {"generation.device": "cpu",
                                                                      "generation.dtype": "bfloat16"})
    stage = GenerateStage(str(adapter), None, config.generation.model_dump(), str(tmp_path))
    model = stage.pipe.model  # base, image encoder and adapter alike
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    auto = load_evaluation_config(REPO / "configs/eval/demo.yaml").generation.model_dump()
    default = GenerateStage(str(adapter), None, auto, str(tmp_path))
    assert {p.dtype for p in default.pipe.model.parameters()} == {torch.float32}  # auto on a CPU machine
    with pytest.raises(PlacementError, match=r"generate stage reserves 1 GPU.*no CUDA device is visible"):
        GenerateStage(str(adapter), None, auto, str(tmp_path), reserved_gpus=1)


@pytest.mark.parametrize("overrides, message", [
    ({"generation.device": "cpu"}, "generate.num_gpus=1 reserves GPUs but generation.device is 'cpu'"),
    ({"generation.device": "auto", "metrics.clip.device": "cpu", "metrics.dino.device": "cpu",
      "metrics.face.device": "cpu", "metrics.locate.model.device": "cpu"},
     "score.num_gpus=0.5 reserves GPUs but every metric model's device is cpu"),
])
def test_an_evaluation_config_reserving_gpus_for_cpu_work_is_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_evaluation_config(REPO / "configs/eval/dreambench.yaml", overrides)


def test_a_serving_app_reserving_gpus_for_cpu_work_is_refused():
    from infra.serving.app import build_app

    with pytest.raises(PlacementError, match="num_gpus=1 reserves GPUs for every replica but device is 'cpu'"):
        build_app({"num_gpus": 1, "device": "cpu"})
    build_app({"num_gpus": 1, "device": "auto", "dtype": "float16"})  # resolved in the replica, on its GPU


def _flip(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    offset = len(data) // 2 if offset is None else offset
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name, damage, message", [
    ("mmdiff_adapter.safetensors", "flip", "mmdiff_adapter.safetensors: sha256 does not match"),
    ("mmdiff_config.json", "flip", "mmdiff_config.json: sha256 does not match"),
    ("mmdiff_adapter.safetensors", "truncate", r"mmdiff_adapter.safetensors: \d+ bytes, .* records \d+"),
    ("checksums.json", "truncate", "checksums.json: not a readable JSON document"),
])
def test_a_damaged_adapter_is_refused_naming_the_file(adapter, tmp_path, name, damage, message):
    copy = Path(shutil.copytree(adapter, tmp_path / "adapter"))
    if damage == "flip":
        _flip(copy / name)
    else:
        (copy / name).write_bytes((copy / name).read_bytes()[:-7])
    with pytest.raises(ValueError, match=message):
        MMDiffModel.from_pretrained(ModelSpec(family="sd15", source="tiny"), copy)


def test_an_adapter_without_checksums_still_names_a_truncated_file(adapter, tmp_path):
    copy = Path(shutil.copytree(adapter, tmp_path / "adapter"))
    (copy / "checksums.json").unlink()  # as written before manifests existed
    config = (copy / "mmdiff_config.json").read_bytes()
    (copy / "mmdiff_config.json").write_bytes(config[: len(config) // 2])
    with pytest.raises(ValueError, match="mmdiff_config.json: not a readable JSON document"):
        MMDiffModel.from_pretrained(ModelSpec(family="sd15", source="tiny"), copy)
    (copy / "mmdiff_config.json").write_bytes(config)
    weights = (copy / "mmdiff_adapter.safetensors").read_bytes()
    (copy / "mmdiff_adapter.safetensors").write_bytes(weights[:-100])
    with pytest.raises(ValueError, match="mmdiff_adapter.safetensors: not a readable safetensors file"):
        MMDiffModel.from_pretrained(ModelSpec(family="sd15", source="tiny"), copy)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_a_stock_diffusers_pipeline_takes_the_adapter_and_the_saved_folder_travels(family, tmp_path):
    """load_mmdiff_adapter on StableDiffusion(XL)Pipeline.from_pretrained equals MMDiffPipeline; the saved
    folder, moved, loads by itself to the same images; a base whose content differs is refused by name."""
    import numpy as np
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from skimage import data

    from mmdiff import MMDiffPipeline, Subject, load_mmdiff_adapter
    from mmdiff.zoo import save_tiny

    folder = save_tiny(family, tmp_path / "base", seed=0)
    config = load_config(REPO / f"configs/mmdiff/tiny_{family}.yaml", MMDiffConfig)
    model = MMDiffModel.from_specs(ModelSpec(family=family, source=str(folder)),
                                   ModelSpec(family="clip_vision", source="tiny"), config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a trained-looking adapter, so the weights show in the images
        for p in model.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    adapter = model.save_pretrained(tmp_path / "adapter")
    args = dict(num_inference_steps=2, height=64, width=64, output_type="np", seed=0)
    subjects = [Subject("dog", data.chelsea())]
    stock_class = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    stock = load_mmdiff_adapter(stock_class.from_pretrained(folder), adapter)
    stock.set_progress_bar_config(disable=True)
    reference = MMDiffPipeline.from_pretrained(ModelSpec(family=family, source=str(folder)), adapter)
    expected = reference("a dog on the beach", subjects, **args).images
    np.testing.assert_allclose(stock("a dog on the beach", subjects, **args).images, expected, atol=1e-6)
    moved = Path(shutil.copytree(reference.save_pretrained(tmp_path / "saved"), tmp_path / "elsewhere"))
    shutil.rmtree(tmp_path / "saved")
    again = MMDiffPipeline.from_pretrained(moved, torch_dtype=torch.float32, device="cpu")
    np.testing.assert_array_equal(again("a dog on the beach", subjects, **args).images, expected)
    assert again.to(dtype=torch.bfloat16).dtype == torch.bfloat16
    other = save_tiny(family, tmp_path / "other-base", seed=1)
    with pytest.raises(ValueError, match=f"base model given \\({other}\\) is not the one this adapter was trained"):
        MMDiffPipeline.from_pretrained(ModelSpec(family=family, source=str(other)), adapter)
    with pytest.raises(ValueError, match="is not the one this adapter was trained"):
        load_mmdiff_adapter(stock_class.from_pretrained(other), adapter)


def test_the_commit_is_known_from_a_checkout_an_image_build_and_a_vcs_install(tmp_path):
    """Adapters record the commit of the code that wrote them; an installed copy has no .git beside it."""
    import json
    import subprocess
    import sys

    from mmdiff.provenance import source_commit

    assert len(source_commit()) == 40  # this checkout
    installed = tmp_path / "site"
    (installed / "mmdiff").mkdir(parents=True)
    shutil.copy(REPO / "mmdiff/provenance.py", installed / "mmdiff/provenance.py")
    (installed / "mmdiff/__init__.py").write_text("")
    info = installed / "mmdiff-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mmdiff\nVersion: 0.1\n")
    (info / "direct_url.json").write_text(json.dumps({"url": "https://example.org/mmdiff.git",
                                                      "vcs_info": {"vcs": "git", "commit_id": "c0ffee" * 6 + "abcd"}}))
    script = "import mmdiff.provenance as p; print(p.source_commit())"
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(installed)}
    run = [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(installed)!r}); {script}"]
    assert subprocess.run(run, cwd=tmp_path, env=env, capture_output=True, text=True, check=True
                          ).stdout.strip() == "c0ffee" * 6 + "abcd"
    env["MMDIFF_GIT_COMMIT"] = "1234abcd"
    assert subprocess.run(run, cwd=tmp_path, env=env, capture_output=True, text=True, check=True
                          ).stdout.strip() == "1234abcd"
