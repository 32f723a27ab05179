"""FSDP with a frozen teacher (:mod:`lightning_distill.sharding`): the plan on the real module tree (every run, no
process group), 2-process CPU runs (gloo) of FSDP1 and FSDP2 against DDP, and on a GPU every method in bf16-mixed
against the same run without FSDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_STUDENT, requires_gpu, write_labels
from lightning.pytorch.strategies import FSDPStrategy
from transformers import AutoModelForCausalLM

from lightning_distill import CoDistill, HardDistill, Performance, SoftDistill, sharding
from lightning_distill.backbone import final_hidden
from lightning_distill.cli import load_checkpoint

TEACHER_REST = ("teacher.model.embed_tokens", "teacher.model.norm", "teacher.model.rotary_emb", "teacher.lm_head")


def built(cls, teacher_dir, **kwargs):
    model = cls(teacher=teacher_dir, student=TINY_STUDENT, **kwargs)
    model.configure_model()
    return model


def plan_of(model):
    """The sharding plan of a built method, with its own settings."""
    return sharding.plan(model, model.trains_teacher, model.hparams.performance.teacher_sharding)


def check_partition(model, layout):
    """Every parameter is in exactly one unit or replicated; a unit holds one model's parameters, in one dtype."""
    params = dict(model.named_parameters())
    placed = [n for u in layout.units for n in u.params] + list(layout.replicated_params)
    assert sorted(placed) == sorted(params)
    for unit in layout.units:
        assert {n.split(".")[0] for n in unit.params} <= {unit.model}, unit.name
        assert {params[n].dtype for n in unit.params} <= {unit.dtype}, unit.name
        assert all(params[n].requires_grad != unit.frozen for n in unit.params), unit.name


# --------------------------------------------------------------------------------------------------- the plan
def test_plan_keeps_a_frozen_teacher_in_its_own_units_and_dtype(tiny_teacher_dir):
    model = built(SoftDistill, tiny_teacher_dir, performance=Performance(teacher_dtype="bfloat16"))
    layout = plan_of(model)
    check_partition(model, layout)
    layers = [f"student.model.layers.{i}" for i in range(2)] + [f"teacher.model.layers.{i}" for i in range(4)]
    assert [u.name for u in layout.units] == [*layers, "student"]
    teacher = [u for u in layout.units if u.model == "teacher"]
    assert all(u.frozen and u.dtype == torch.bfloat16 for u in teacher)
    assert set(layout.replicated) == set(TEACHER_REST)
    root = layout.units[-1]
    assert root.params == ("student.model.embed_tokens.weight", "student.model.norm.weight")  # head tied to embedding
    assert layout.unit_of("teacher.model.embed_tokens.weight") is None


def test_plan_replicates_a_small_teacher_whole(tiny_teacher_dir):
    model = built(SoftDistill, tiny_teacher_dir, performance=Performance(teacher_sharding="replicate"))
    layout = plan_of(model)
    check_partition(model, layout)
    assert layout.replicated == ("teacher",) and all(u.model == "student" for u in layout.units)


def test_plan_shards_a_trained_teacher_like_the_student(tiny_teacher_dir):
    model = built(CoDistill, tiny_teacher_dir)
    layout = plan_of(model)
    check_partition(model, layout)
    assert layout.replicated == ()
    teacher = {u.name: u for u in layout.units if u.model == "teacher"}
    assert not any(u.frozen for u in teacher.values())
    assert teacher["teacher"].params == ("teacher.model.embed_tokens.weight", "teacher.model.norm.weight")


def test_plan_without_a_kept_teacher(tiny_teacher_dir, tmp_path):
    store = write_labels(SoftDistill(teacher=tiny_teacher_dir, student=TINY_STUDENT), tmp_path / "store", k=4)
    model = built(SoftDistill, tiny_teacher_dir, labels=store)
    layout = plan_of(model)
    check_partition(model, layout)
    assert model.teacher is None and {u.model for u in layout.units} == {"student"}


def cpu_fsdp1() -> FSDPStrategy:
    """Lightning's FSDPStrategy on one CPU device, enough to prepare a module outside a Trainer."""
    strategy = FSDPStrategy()
    strategy.parallel_devices = [torch.device("cpu")]
    return strategy


def prepare_fsdp1(model, world_size: int) -> FSDPStrategy:
    """What ``configure_model`` does under FSDP1 on ``world_size`` ranks: the method's sharding problem, if any,
    raised by :func:`sharding.prepare`, else the plan handed to the strategy."""
    strategy = cpu_fsdp1()
    sharding.prepare(model, strategy, model.trains_teacher, model.hparams.performance.teacher_sharding,
                     model.sharding_problem(world_size))
    return strategy


def test_settings_that_do_not_shard_are_refused(tiny_teacher_dir):
    with pytest.raises(ValueError, match="stale_every=2"):
        prepare_fsdp1(built(CoDistill, tiny_teacher_dir, stale_every=2), world_size=1)
    hard = built(HardDistill, tiny_teacher_dir, mode="generate")
    assert hard.sharding_problem(world_size=1) is None
    with pytest.raises(ValueError, match="teacher_sharding='replicate'"):
        prepare_fsdp1(hard, world_size=2)
    replicated = built(HardDistill, tiny_teacher_dir, mode="generate",
                       performance=Performance(teacher_sharding="replicate"))
    assert replicated.sharding_problem(world_size=2) is None
    prepare_fsdp1(replicated, world_size=2)
    with pytest.raises(ValueError, match=r"performance\.teacher_sharding must be one of"):  # checked in its group
        Performance(teacher_sharding="split")
    model = built(SoftDistill, tiny_teacher_dir)
    model.student.model.layers[0].mlp.to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"student.model.layers.0 mixes parameter dtypes"):
        plan_of(model)


def test_fsdp1_policy_and_ignored_modules_follow_the_plan(tiny_teacher_dir):
    model = built(SoftDistill, tiny_teacher_dir, performance=Performance(teacher_dtype="bfloat16"))
    strategy = cpu_fsdp1()
    sharding._prepare_fsdp1(model, strategy, model.trains_teacher, model.hparams.performance.teacher_sharding, None)
    targets = strategy.kwargs["auto_wrap_policy"]._run_policy(model, set(), {"mixed_precision": "root's"})
    by_name = {name: targets[m] for name, m in model.named_modules() if m in targets}
    assert sorted(by_name) == sorted(u.name for u in plan_of(model).units if u.name != "student")
    for name, kwargs in by_name.items():
        if name.startswith("teacher."):
            assert kwargs["mixed_precision"] is None  # computed in its own dtype, never cast
        else:
            assert kwargs["mixed_precision"].cast_forward_inputs
    ignored = strategy.kwargs["ignored_states"]
    assert sorted(n for n, m in model.named_modules() if any(m is i for i in ignored)) == sorted(TEACHER_REST)


def test_final_hidden_without_fsdp_is_the_decoder_output(tiny_teacher_dir):
    model = built(SoftDistill, tiny_teacher_dir)
    ids = torch.randint(0, 300, (2, 8))
    expected = model.student.get_decoder()(input_ids=ids).last_hidden_state
    torch.testing.assert_close(final_hidden(model.student, ids), expected)


# ---------------------------------------------------------------------------------------- real runs (workers)
def run_worker(tmp_path: Path, name: str, **spec) -> dict:
    """One worker run (2 processes on CPU unless ``devices``/``accelerator`` say otherwise); its report."""
    folder = tmp_path / name
    folder.mkdir()
    spec = {"out": str(folder / "report.json"), "dir": str(folder), "devices": 2, **spec}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2])}
    worker = Path(__file__).with_name("fsdp_worker.py")
    result = subprocess.run([sys.executable, str(worker), json.dumps(spec)], env=env, cwd=folder,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((folder / "report.json").read_text())


def student_weights(report: dict) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(report["exported"]).state_dict()


def check_run(report: dict, frozen_teacher: bool) -> None:
    """A sharded run: no unit mixes the models, a frozen teacher has no optimizer state and is not checkpointed,
    and the checkpoint reloads into the student that was exported."""
    assert report["sharded"] and report["global_step"] == 3 and len(report["losses"]) == 3
    for unit in report["layout"]["units"]:
        owners = {n.split(".")[0] for n in unit["params"]}
        assert len(owners) == 1, unit["params"]
        if owners == {"teacher"} and frozen_teacher:
            assert unit["dtype"] == "torch.bfloat16" and not unit["requires_grad"]
    assert report["teacher_in_optimizer_state"] is not frozen_teacher
    assert any(k.startswith("teacher.") for k in report["checkpoint_keys"]) is not frozen_teacher
    reloaded = load_checkpoint(report["checkpoint"]).student.state_dict()
    for key, value in student_weights(report).items():
        torch.testing.assert_close(reloaded[key], value, msg=key)


@pytest.fixture(scope="module")
def soft_runs(tiny_teacher_dir, tmp_path_factory):
    """SoftDistill with a bf16 teacher and the chunked loss from its hidden states, under DDP, FSDP1 and FSDP2."""
    tmp = tmp_path_factory.mktemp("soft_fsdp")
    spec = {"teacher": tiny_teacher_dir, "method": "soft",
            "kwargs": {"performance": {"teacher_dtype": "bfloat16", "chunk_size": 16}, "ce_weight": 0.5}}
    return {strategy: run_worker(tmp, strategy, strategy=strategy, **spec) for strategy in ("ddp", "fsdp", "fsdp2")}


def test_soft_under_fsdp1_and_fsdp2_matches_ddp(soft_runs):
    ddp = soft_runs["ddp"]
    for strategy in ("fsdp", "fsdp2"):
        report = soft_runs[strategy]
        check_run(report, frozen_teacher=True)
        assert report["checkpoint_keys"] == ddp["checkpoint_keys"]
        assert report["optimizer_state_numel"] == ddp["optimizer_state_numel"] // 2  # the student's, halved
        # FSDP2 computes as DDP (autocast); FSDP1 casts the student's weights to bf16 before the step
        tolerance = 1e-5 if strategy == "fsdp2" else 1e-3
        torch.testing.assert_close(torch.tensor(report["losses"]), torch.tensor(ddp["losses"]), rtol=tolerance,
                                   atol=0)
        reference = student_weights(ddp)
        for key, value in student_weights(report).items():
            torch.testing.assert_close(value, reference[key], rtol=0, atol=10 * tolerance, msg=key)
    params = soft_runs["fsdp2"]["layout"]["params"]
    assert all(p["dtensor"] for n, p in params.items() if n.startswith("student."))
    assert all(p["dtensor"] == (".layers." in n) for n, p in params.items() if n.startswith("teacher."))
    assert all(p["dtype"] == "torch.bfloat16" and not p["optimized"] for n, p in params.items()
               if n.startswith("teacher."))


def test_fsdp1_resumes_from_a_checkpoint_without_the_teacher(soft_runs, tiny_teacher_dir, tmp_path):
    report = run_worker(tmp_path, "resume", strategy="fsdp", teacher=tiny_teacher_dir, method="soft",
                        max_steps=4, resume=soft_runs["fsdp"]["checkpoint"],
                        kwargs={"performance": {"teacher_dtype": "bfloat16", "chunk_size": 16}, "ce_weight": 0.5})
    assert report["global_step"] == 4 and len(report["losses"]) == 1


def test_codistill_under_fsdp1_trains_and_checkpoints_its_teacher(tiny_teacher_dir, tmp_path):
    report = run_worker(tmp_path, "co", strategy="fsdp", teacher=tiny_teacher_dir, method="co",
                        kwargs={"kd_weight": 0.5, "schedule": {"kind": "constant"}})
    check_run(report, frozen_teacher=False)
    assert any(u["requires_grad"] and u["params"][0].startswith("teacher.") for u in report["layout"]["units"])


def test_harddistill_under_fsdp2_with_a_replicated_teacher(tiny_teacher_dir, tmp_path):
    report = run_worker(tmp_path, "hard", strategy="fsdp2", teacher=tiny_teacher_dir, method="hard",
                        kwargs={"performance": {"teacher_dtype": "bfloat16", "teacher_sharding": "replicate",
                                                "chunk_size": 8}})
    check_run(report, frozen_teacher=True)
    params = report["layout"]["params"]
    assert not any(p["dtensor"] for n, p in params.items() if n.startswith("teacher."))


# ------------------------------------------------------------------------------------------------------ GPU
GPU_METHODS = {
    "soft": {"performance": {"teacher_dtype": "auto", "chunk_size": 64}, "ce_weight": 0.5},
    "hard": {"performance": {"teacher_dtype": "auto"}},
    "co": {"kd_weight": 0.5, "schedule": {"kind": "constant"}},
}


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("method", sorted(GPU_METHODS))
def test_every_method_under_fsdp_on_gpu_matches_the_run_without(method, tiny_teacher_dir, tmp_path):
    devices = min(torch.cuda.device_count(), 2)
    spec = {"teacher": tiny_teacher_dir, "method": method, "kwargs": GPU_METHODS[method], "accelerator": "cuda",
            "devices": devices, "precision": "bf16-mixed"}
    reference = run_worker(tmp_path, "reference", strategy="ddp" if devices > 1 else "single", **spec)
    for strategy in ("fsdp", "fsdp2"):
        report = run_worker(tmp_path, strategy, strategy=strategy, **spec)
        check_run(report, frozen_teacher=method != "co")
        torch.testing.assert_close(torch.tensor(report["losses"]), torch.tensor(reference["losses"]), rtol=2e-2,
                                   atol=0)
        assert len(report["peak_memory"]) == devices


TINY_CONFIGS = sorted((Path(__file__).parents[2] / "configs" / "tiny").glob("*.yaml"))


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("path", TINY_CONFIGS, ids=lambda p: p.stem)
def test_tiny_config_fits_with_strategy_fsdp_on_gpu(path, tiny_teacher_dir, tmp_path):
    command = [sys.executable, "-m", "lightning_distill", "fit", "--config", str(path),
               "--model.init_args.teacher", tiny_teacher_dir, "--trainer.default_root_dir", str(tmp_path),
               "--trainer.accelerator", "cuda", "--trainer.devices", "1", "--trainer.strategy", "fsdp",
               "--trainer.precision", "bf16-mixed"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "`Trainer.fit` stopped: `max_steps=" in done.stdout + done.stderr
