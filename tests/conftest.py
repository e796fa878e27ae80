"""Suite-wide settings: no test may reach a model hub."""

import os

import pytest

# Set before transformers/diffusers/huggingface_hub are imported by any test module.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.path.dirname(__file__), "..", ".cache", "torch_extensions"))
os.environ.setdefault("MPLCONFIGDIR", os.path.join(os.path.dirname(__file__), "..", ".cache", "matplotlib"))


@pytest.fixture(scope="module")
def single_thread():
    """Tiny models gain nothing from intra-op threads, and two OpenMP threads on a shared, busy 2-core
    machine run them tens of times slower; modules opt in and the setting is restored after them."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ray_session():
    """An embedded Ray (2 CPUs) for the module's jobs; modules that start their own cluster do not ask for it.

    Ray keeps as many idle worker processes as it has CPUs (2) and ends the others a second after their
    task, but a job's fractional stages run up to 8 at once: each job then started fresh workers, each
    importing torch and the pipeline (seconds of CPU each; a dozen per job over a handful of photos). The
    test Ray keeps 8, so the module's next job runs on warm ones. It is not shared across modules: a job
    whose workers crashed used to leave actors holding CPUs behind, starving the next module's jobs (jobs
    now end their actors, pipeline/roster.py; sharing one Ray across modules has not been tried since)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _system_config={"num_workers_soft_limit": 8})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module", autouse=True)
def mlflow_uris_stay_in_their_module():
    """mlflow.set_tracking_uri / set_registry_uri also write MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI into
    os.environ, so a module that called them in-process would send later modules' subprocesses (training
    launches, Ray workers) to its own, by then stopped, server. Each module starts from the environment
    and MLflow globals it found."""
    import mlflow

    names = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    before = {name: os.environ.get(name) for name in names}
    yield
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
