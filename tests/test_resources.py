"""The `resources` section as Ray sees it, and what `llmpipe submit` refuses before contacting a cluster."""

from __future__ import annotations

import pytest
import yaml

from pipeline.cluster.jobs import check_submittable
from pipeline.cluster.resources import task_options, train_scaling
from pipeline.config import load_config
from pipeline.engine.plan import graph
from pipeline.engine.stage import fingerprint
from pipeline.errors import ConfigError, JobError
from pipeline.schema import StageResources
from pipeline.stages import STAGES
from tests.conftest import tiny_raw


def test_stage_resources_become_ray_task_options():
    res = StageResources(num_cpus=2, num_gpus=0.5, memory_gb=1.5, custom={"gpu_node": 1},
                         label_selector={"ray.io/accelerator-type": "H100"}, spread=True)
    opts = task_options(res, "evaluate", max_retries=3)
    assert opts == {"num_cpus": 2, "num_gpus": 0.5, "memory": int(1.5 * 2**30), "resources": {"gpu_node": 1},
                    "label_selector": {"ray.io/accelerator-type": "H100"}, "scheduling_strategy": "SPREAD", "max_retries": 3}


def test_train_resources_become_a_scaling_config_per_worker():
    kw = train_scaling(StageResources(num_cpus=4, num_gpus=1, custom={"a100": 1}, spread=True), 8)
    assert kw == {"num_workers": 8, "use_gpu": True, "resources_per_worker": {"CPU": 4, "a100": 1, "GPU": 1},
                  "placement_strategy": "SPREAD"}
    cpu = train_scaling(StageResources(num_gpus=0), 2)
    assert cpu["use_gpu"] is False and "GPU" not in cpu["resources_per_worker"] and cpu["placement_strategy"] == "PACK"


@pytest.mark.slow
def test_gpu_stages_ask_for_a_gpu_only_when_the_cluster_has_one(ray_local):
    assert ray_local.cluster_resources().get("GPU", 0) == 0
    assert task_options(StageResources(), "evaluate")["num_gpus"] == 0
    assert task_options(StageResources(), "prepare")["num_gpus"] == 0


def test_resources_never_change_a_fingerprint(tiny_config):
    def fps(cfg):
        out = {}
        for s in graph(cfg, STAGES):  # the stages this config runs
            out[s.name] = fingerprint(s, s.section(cfg), {n: out[n] for n in s.needs_for(cfg)})
        return out

    base = tiny_config()
    moved = tiny_config(resources={"prepare": {"num_cpus": 4, "spread": True}, "evaluate": {"num_gpus": 1},
                                   "train": {"num_gpus": 0, "num_cpus": 2, "custom": {"x": 1}}})
    assert fps(base) == fps(moved)
    # except the device kind the train workers get, which the train fingerprint holds (with what precision: auto
    # resolved to): a model trained on CPUs is not the one a GPU run would train
    gpu = fps(tiny_config(resources={"train": {"num_gpus": 1}}))
    assert [n for n in gpu if gpu[n] != fps(base)[n]] == ["train", "evaluate", "decode"]


def test_a_key_that_moved_to_resources_says_where(tmp_path, corpus_dir):
    raw = tiny_raw(corpus_dir, tmp_path / "a")
    raw["train"]["cpus_per_worker"] = 2
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"train.cpus_per_worker: unknown key \(moved to resources.train.num_cpus\)"):
        load_config(path)


def _config(folder, corpus, root) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_raw(corpus, root)))
    return str(path)


def test_submit_refuses_what_cannot_work_on_a_cluster_before_contacting_it(tmp_path, corpus_dir):
    wd = tmp_path / "wd"
    good = _config(wd, corpus_dir, "s3://bucket/prefix")
    assert check_submittable(good, [], wd, "http://10.0.0.2:5000") == "c.yaml"
    with pytest.raises(JobError, match="store.root 'artifacts' is a relative path"):
        check_submittable(good, ["store.root=artifacts"], wd, "http://10.0.0.2:5000")
    with pytest.raises(JobError, match="needs an MLflow server the cluster can reach, got sqlite:///mlflow.db"):
        check_submittable(good, [], wd, "sqlite:///mlflow.db")
    with pytest.raises(JobError, match="no MLFLOW_TRACKING_URI"):
        check_submittable(good, [], wd, None)
    assert check_submittable(good, ["tracking.enabled=false"], wd, None) == "c.yaml"
    outside = _config(tmp_path / "elsewhere", corpus_dir, "s3://bucket/prefix")
    with pytest.raises(JobError, match="must be inside the folder shipped to the cluster"):
        check_submittable(outside, [], wd, "http://10.0.0.2:5000")
    with pytest.raises(ConfigError, match="train.stpes: unknown key"):
        check_submittable(good, ["train.stpes=3"], wd, "http://10.0.0.2:5000")
