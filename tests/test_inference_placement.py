"""One device-and-precision rule for inference (mmdiff.placement): auto resolves to the accelerator in bf16
when there is one (the CPU in fp32 here); evaluation and serving pass device and dtype through; anything
that reserves GPUs and would compute on the CPU is refused."""

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
