"""ServedTeacher: a student trained from a served teacher's top-k equals one trained from a top-k label store of the
same teacher (validation included); prefetch asks each training batch once, ahead, and a run resumed from a
checkpoint ends where an uninterrupted one does."""

from __future__ import annotations

import threading

import lightning as L
import pytest
import serving
import torch
from conftest import TINY_STUDENT, small_data, tiny_trainer, write_labels
from lightning.pytorch.callbacks import OnExceptionCheckpoint

from lightning_distill import HardDistill, Performance, Served, SoftDistill
from lightning_distill.serve.client import ServerUnavailableError, TeacherClient
from lightning_distill.signals import ServedTeacher
from lightning_distill.signals.served import Lookahead

STEPS = 4
K = 8


def student_weights(model: SoftDistill) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.student.state_dict().items()}


def largest_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def fit(model, root, ckpt_path=None, **kwargs) -> L.Trainer:
    L.seed_everything(0)
    trainer = tiny_trainer(root, **{"max_steps": STEPS, "limit_val_batches": 2, "val_check_interval": 2, **kwargs})
    trainer.fit(model, small_data(), ckpt_path=ckpt_path)
    return trainer


def served(server, teacher, **options) -> SoftDistill:
    return SoftDistill(teacher=server.url, tokenizer=teacher, student=TINY_STUDENT, served=Served(k=K, **options))


class Requests:
    """Counts the client's requests: sent ahead (a background thread) or asked by the step itself."""

    def __init__(self, monkeypatch) -> None:
        self.ahead, self.now = 0, 0
        submit, ask = TeacherClient.submit, TeacherClient.ask

        def counted_submit(client, *args, **kwargs):
            self.ahead += 1
            return submit(client, *args, **kwargs)

        def counted_ask(client, *args, **kwargs):
            self.now += threading.current_thread() is threading.main_thread()
            return ask(client, *args, **kwargs)

        monkeypatch.setattr(TeacherClient, "submit", counted_submit)
        monkeypatch.setattr(TeacherClient, "ask", counted_ask)


@pytest.fixture(scope="module")
def topk_store(tiny_teacher_dir, tmp_path_factory) -> str:
    """A top-k store (k = 8) of the tiny teacher."""
    labeller = SoftDistill(teacher=tiny_teacher_dir, student=TINY_STUDENT,
                           performance=Performance(teacher_dtype="float32"))
    return write_labels(labeller, tmp_path_factory.mktemp("topk") / "store", kind="topk", k=K)


@pytest.fixture(scope="module")
def stored_run(tiny_teacher_dir, topk_store, tmp_path_factory):
    """The student trained from the top-k store, and its validation metrics."""
    root = tmp_path_factory.mktemp("stored")
    model = SoftDistill(teacher=tiny_teacher_dir, student=TINY_STUDENT, labels=topk_store)
    trainer = fit(model, root)
    return student_weights(model), {k: v.item() for k, v in trainer.callback_metrics.items() if k.startswith("val/")}


def test_served_top_k_trains_the_student_a_top_k_store_trains(served_tiny_teacher, tiny_teacher_dir, stored_run,
                                                              tmp_path, monkeypatch):
    requests = Requests(monkeypatch)
    model = served(served_tiny_teacher, tiny_teacher_dir)
    trainer = fit(model, tmp_path)
    assert isinstance(model.signal, ServedTeacher) and model.teacher is None and model.signal.client is None
    weights, metrics = stored_run
    assert largest_difference(weights, student_weights(model)) <= 1e-5
    for name in ("val/kl", "val/agreement", "val/ce"):  # validation asks the server too: the same targets
        assert trainer.callback_metrics[name].item() == pytest.approx(metrics[name], abs=1e-5)
    untrained = SoftDistill(teacher=tiny_teacher_dir, student=TINY_STUDENT)
    untrained.configure_model()
    assert largest_difference(weights, student_weights(untrained)) > 1e-4  # it trained (warmup: small steps)
    # prefetch: every training batch was asked ahead (the 4 trained and the one drawn after the last); only the
    # 2 x 2 validation batches were asked when their step needed them
    assert (requests.ahead, requests.now) == (STEPS + 1, 4)


def test_without_prefetch_each_batch_is_asked_when_needed(served_tiny_teacher, tiny_teacher_dir, stored_run,
                                                          tmp_path, monkeypatch):
    requests = Requests(monkeypatch)
    model = served(served_tiny_teacher, tiny_teacher_dir, prefetch=False)
    fit(model, tmp_path, limit_val_batches=0)
    assert largest_difference(stored_run[0], student_weights(model)) <= 1e-5
    assert (requests.ahead, requests.now) == (0, STEPS)


def test_hard_distill_from_a_server_trains_on_the_picks_a_store_gives(served_tiny_teacher, tiny_teacher_dir,
                                                                       topk_store, tmp_path, monkeypatch):
    """HardDistill top1 with a served teacher (k=1 by default: only the picks travel) trains the student a top-k
    store's arg-max trains, prefetched."""
    requests = Requests(monkeypatch)
    model = HardDistill(teacher=served_tiny_teacher.url, tokenizer=tiny_teacher_dir, student=TINY_STUDENT)
    fit(model, tmp_path / "served", limit_val_batches=0)
    assert isinstance(model.signal, ServedTeacher) and model.signal.options.k == 1 and model.teacher is None
    stored = HardDistill(teacher=tiny_teacher_dir, student=TINY_STUDENT, labels=topk_store)
    fit(stored, tmp_path / "stored", limit_val_batches=0)
    assert largest_difference(student_weights(stored), student_weights(model)) <= 1e-5
    untrained = HardDistill(teacher=tiny_teacher_dir, student=TINY_STUDENT)
    untrained.configure_model()
    assert largest_difference(student_weights(untrained), student_weights(model)) > 1e-4
    assert (requests.ahead, requests.now) == (STEPS + 1, 0)


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(served_tiny_teacher, tiny_teacher_dir, stored_run,
                                                            tmp_path):
    """Killed after step 2 (its checkpoint written on the exception), resumed: the same final weights."""

    class KillAt(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 2:
                raise RuntimeError("killed at step 2")

    saver = OnExceptionCheckpoint(str(tmp_path), "interrupted")
    with pytest.raises(RuntimeError, match="killed"):
        fit(served(served_tiny_teacher, tiny_teacher_dir), tmp_path, callbacks=[KillAt(), saver],
            limit_val_batches=0)
    resumed = served(served_tiny_teacher, tiny_teacher_dir)
    fit(resumed, tmp_path, ckpt_path=str(tmp_path / "interrupted.ckpt"), limit_val_batches=0)
    assert resumed.global_step == STEPS
    assert largest_difference(stored_run[0], student_weights(resumed)) <= 1e-5


def test_lookahead_hands_each_batch_over_one_step_early():
    events = []
    loader = Lookahead([1, 2, 3], lambda batch: events.append(("ahead", batch)))
    for batch in loader:
        events.append(("train", batch))
    assert events == [("ahead", 1), ("ahead", 2), ("train", 1), ("ahead", 3), ("train", 2), ("train", 3)]
    assert len(loader) == 3 and loader.count(2) == 1  # the loader's own attributes


def test_answers_are_keyed_by_the_batch_not_by_its_turn(tiny_teacher_dir):
    """A batch asked ahead is never given to another batch: out of turn, the step's own batch is asked."""
    signal = ServedTeacher("http://127.0.0.1:9", Served(k=2))

    class Echo:  # answers with the batch's first token id
        vocab_size = None

        def submit(self, kind, input_ids, mask=None, **settings):
            future = __import__("concurrent.futures").futures.Future()
            future.set_result(self.ask(kind, input_ids))
            return future

        def ask(self, kind, input_ids, mask=None, **settings):
            first = input_ids[:, :1, None].expand(-1, input_ids.shape[1], 2)
            return {"topk_ids": first, "topk_logprobs": torch.zeros(first.shape), "argmax": first[..., 0]}

    signal.client = Echo()
    batches = [{"input_ids": torch.full((2, 3), i)} for i in range(3)]
    signal.ask_ahead(batches[0])
    signal.ask_ahead(batches[1])
    run = None
    assert signal.distribution(run, batches[2]).ids[0, 0, 0] == 2  # not asked ahead: asked now
    assert signal.distribution(run, batches[1]).ids[0, 0, 0] == 1
    assert signal.distribution(run, batches[0]).ids[0, 0, 0] == 0
    assert not signal._pending


def test_a_server_killed_mid_fit_stops_it_with_a_checkpoint_and_the_restarted_one_resumes_it(
        served_tiny_teacher, tiny_teacher_dir, stored_run, tmp_path):
    """The server goes away after step 2: the fit retries for served.retry_for, stops naming the URL, and its
    checkpoint is written; the server back, the fit resumed from that checkpoint ends where the uninterrupted one
    does."""
    proxy = serving.Proxy(served_tiny_teacher.url)

    class KillServerAt(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 2:
                proxy.down()

    saver = OnExceptionCheckpoint(str(tmp_path), "interrupted")
    first = served(proxy, tiny_teacher_dir, retry_for=1.0)
    try:
        with pytest.raises(ServerUnavailableError, match=rf"{proxy.url}/v1/distill failed \d+ time\(s\).*"
                                                         r"\(served.retry_for=1.0\).*--ckpt_path last"):
            fit(first, tmp_path, callbacks=[KillServerAt(), saver], limit_val_batches=0)
        assert 2 <= torch.load(tmp_path / "interrupted.ckpt", weights_only=False)["global_step"] < STEPS
        proxy.up()
        resumed = served(proxy, tiny_teacher_dir)
        fit(resumed, tmp_path, ckpt_path=str(tmp_path / "interrupted.ckpt"), limit_val_batches=0)
    finally:
        proxy.down()
    assert resumed.global_step == STEPS
    assert largest_difference(stored_run[0], student_weights(resumed)) <= 1e-5
